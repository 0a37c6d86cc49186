//! Certificates from `[tls]` files, written by another agent (Vault Agent, cert-manager) and
//! polled for changes, including replacement by atomic rename.

use crate::tls::credentials::CredentialPart;
use crate::tls::{CredentialStore, Credentials};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use ward_config::proxy::{ServiceConfig, TlsFiles};
use ward_config::SpiffeId;

/// How often the files are checked for a change.
const POLL: Duration = Duration::from_millis(500);
/// Writers replace the key and the certificate one after the other: retry a mismatched pair
/// this often, for this long, before refusing it.
const SETTLE_STEP: Duration = Duration::from_millis(100);
const SETTLE_TRIES: u32 = 30;

/// Why the files could not be used, naming the config key of the file at fault.
#[derive(Debug, thiserror::Error)]
#[error("key `{key}`: {}: {message}", path.display())]
pub struct FileError {
    pub key: &'static str,
    pub path: PathBuf,
    pub message: String,
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| FileError {
        key,
        path: path.to_owned(),
        message: format!("cannot read: {e}"),
    })
}

/// Reads and checks the three files, and that the certificate is this service's identity.
pub fn load(files: &TlsFiles, service: &ServiceConfig) -> Result<Credentials, FileError> {
    let cert = read("tls.cert_file", &files.cert_file)?;
    let key = read("tls.key_file", &files.key_file)?;
    let roots = read("tls.ca_file", &files.ca_file)?;
    let creds = Credentials::from_pem(&cert, &key, &roots).map_err(|e| {
        let (key, path) = match e.part() {
            CredentialPart::Certificate => ("tls.cert_file", &files.cert_file),
            CredentialPart::Key => ("tls.key_file", &files.key_file),
            CredentialPart::Roots => ("tls.ca_file", &files.ca_file),
        };
        FileError {
            key,
            path: path.clone(),
            message: e.to_string(),
        }
    })?;
    check_own_identity(&creds.leaf.id, service).map_err(|e| FileError {
        key: "tls.cert_file",
        path: files.cert_file.clone(),
        message: e.to_string(),
    })?;
    Ok(creds)
}

/// A certificate for another identity than this proxy's `[service]`.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "certificate is for {found}, not for service {:?} in namespace {:?}{}",
    service.name.as_str(),
    service.namespace.as_str(),
    service
        .trust_domain
        .as_ref()
        .map(|td| format!(" of trust domain {:?}", td.as_str()))
        .unwrap_or_default()
)]
pub struct WrongIdentity {
    pub found: Box<SpiffeId>,
    pub service: Box<ServiceConfig>,
}

/// The proxy's certificate (its SPIFFE ID `id`) must name this very service, or it refuses
/// to use it.
pub fn check_own_identity(id: &SpiffeId, service: &ServiceConfig) -> Result<(), WrongIdentity> {
    let td_ok = service
        .trust_domain
        .as_ref()
        .is_none_or(|td| td == &id.trust_domain);
    if id.service != service.name || id.namespace != service.namespace || !td_ok {
        return Err(WrongIdentity {
            found: Box::new(id.clone()),
            service: Box::new(service.clone()),
        });
    }
    Ok(())
}

type Stamp = Vec<Option<(i64, i64, u64, u64, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.cert_file, &files.key_file, &files.ca_file]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.mtime(), m.mtime_nsec(), m.size(), m.ino(), m.dev()))
        })
        .collect()
}

/// Polls the files and swaps in new credentials; a bad set is refused with one log line and
/// the old credentials stay in use.
pub async fn watch(
    files: TlsFiles,
    service: ServiceConfig,
    store: Arc<CredentialStore>,
    stop: CancellationToken,
) {
    let mut seen = stamp(&files);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let now = stamp(&files);
        if now == seen {
            continue;
        }
        let mut tries = 0;
        let result = loop {
            match load(&files, &service) {
                Ok(c) => break Ok(c),
                Err(e) if tries < SETTLE_TRIES => {
                    tries += 1;
                    tracing::debug!(error = %e, "new certificate files not usable yet; retrying");
                    tokio::time::sleep(SETTLE_STEP).await;
                }
                Err(e) => break Err(e),
            }
        };
        seen = stamp(&files);
        match result {
            Ok(creds) => {
                tracing::info!(serial = %creds.leaf.serial, id = %creds.leaf.id, "certificate reloaded");
                metrics::counter!(crate::metrics::CERT_RELOADS, "result" => "ok").increment(1);
                store.store(creds);
            }
            Err(e) => {
                metrics::counter!(crate::metrics::CERT_RELOADS, "result" => "error").increment(1);
                tracing::warn!(
                    "refused new certificate files, keeping the current certificate: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_config::{Name, TrustDomain};

    #[test]
    fn a_certificate_for_another_identity_is_refused_naming_both() {
        let service = ServiceConfig {
            name: Name::new("order").unwrap(),
            namespace: Name::default_namespace(),
            trust_domain: None,
        };
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let own = id("spiffe://mesh.test/ns/default/svc/order");
        assert!(check_own_identity(&own, &service).is_ok());
        let e =
            check_own_identity(&id("spiffe://mesh.test/ns/default/svc/web"), &service).unwrap_err();
        assert_eq!(e.found.service.as_str(), "web");
        assert_eq!(
            e.to_string(),
            "certificate is for spiffe://mesh.test/ns/default/svc/web, not for service \"order\" in namespace \"default\""
        );
        let pinned = ServiceConfig {
            trust_domain: Some(TrustDomain::new("other.test").unwrap()),
            ..service
        };
        let e = check_own_identity(&own, &pinned).unwrap_err();
        assert_eq!(*e.found, own);
        assert!(
            e.to_string().ends_with(" of trust domain \"other.test\""),
            "{e}"
        );
    }
}
