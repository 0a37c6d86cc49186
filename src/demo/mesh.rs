//! The demo's conversation with the control plane: join tokens, the intention, and the rogue's
//! genuine mesh identity (a CSR signed for its own join token, as any proxy would get).

use super::pki::LeafFiles;
use super::proxies::ControlPlane;
use crate::cli::{admin, Output, ServerArgs};
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use std::path::{Path, PathBuf};
use ward_control_client::channel::ServerTarget;
use ward_proto::v1;

pub struct Mesh {
    pub cp: ControlPlane,
    /// The admin token, for the `ward intention` commands the demo runs as an operator would.
    pub admin_token: String,
    admin: admin::Admin,
}

/// Reads `export NAME=value` lines.
fn export(lines: &[String], name: &str) -> Option<String> {
    lines.iter().find_map(|l| {
        l.strip_prefix(&format!("export {name}="))
            .map(str::to_owned)
    })
}

impl Mesh {
    pub async fn connect(export_lines: &[String]) -> anyhow::Result<Self> {
        let address = export(export_lines, "WARD_ADDR")
            .ok_or_else(|| anyhow::anyhow!("the dev server printed no WARD_ADDR"))?;
        let ca_file = PathBuf::from(
            export(export_lines, "WARD_CACERT")
                .ok_or_else(|| anyhow::anyhow!("the dev server printed no WARD_CACERT"))?,
        );
        let token = export(export_lines, "WARD_TOKEN")
            .ok_or_else(|| anyhow::anyhow!("the dev server printed no WARD_TOKEN"))?;
        let args = ServerArgs {
            address: Some(address.clone()),
            token: Some(token.clone()),
            token_file: None,
            ca_cert: Some(ca_file.clone()),
            output: Output::Table,
        };
        let admin = admin::connect(&args).await?;
        Ok(Self {
            cp: ControlPlane { address, ca_file },
            admin_token: token,
            admin,
        })
    }

    /// A single-use join token for `service`, written to `<dir>/<service>.token` (0600).
    pub async fn token_file(&mut self, dir: &Path, service: &str) -> anyhow::Result<PathBuf> {
        let resp = self
            .admin
            .create_token(v1::CreateTokenRequest {
                service: service.into(),
                namespace: "default".into(),
                ttl_seconds: 0,
                uses: 1,
            })
            .await
            .map_err(|s| admin::status("token create", s))?
            .into_inner();
        let path = dir.join(format!("{service}.token"));
        super::pki::write_private(&path, resp.token.as_bytes())?;
        Ok(path)
    }

    pub async fn allow(&mut self, source: &str, destination: &str) -> anyhow::Result<()> {
        self.admin
            .create_intention(v1::CreateIntentionRequest {
                intention: Some(v1::Intention {
                    source: source.into(),
                    destination: destination.into(),
                    action: v1::Action::Allow as i32,
                    ..Default::default()
                }),
                replace: true,
            })
            .await
            .map_err(|s| admin::status("intention create", s))?;
        Ok(())
    }

    /// Gets a real mesh certificate for `service` with the join token in `token_file`.
    pub async fn identity(
        &self,
        dir: &Path,
        service: &str,
        token_file: &Path,
    ) -> anyhow::Result<LeafFiles> {
        let target = ServerTarget::parse(&self.cp.address, &self.cp.ca_file, None)?;
        let channel = target.connect(None).await?;
        let td = target
            .trust_domain()
            .ok_or_else(|| anyhow::anyhow!("the server proved no trust domain"))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{td}/ns/default/svc/{service}").try_into()?,
        )];
        let csr = params.serialize_request(&key)?.der().to_vec();
        let mut request = tonic::Request::new(v1::SignRequest { csr });
        let token = std::fs::read_to_string(token_file)?;
        request.metadata_mut().insert(
            ward_proto::AUTHORIZATION,
            format!("Bearer {}", token.trim()).parse()?,
        );
        let resp = v1::identity_client::IdentityClient::new(channel)
            .sign(request)
            .await
            .map_err(|s| admin::status("sign", s))?
            .into_inner();
        let chain: String = resp
            .cert_chain
            .iter()
            .map(|der| super::pki::pem("CERTIFICATE", der))
            .collect();
        super::pki::write_leaf(dir, service, &chain, &key)
    }
}
