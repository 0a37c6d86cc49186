//! `ward cert inspect FILE`: decode PEM certificates.

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::path::Path;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub fn run(path: &Path) -> anyhow::Result<()> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("{} holds no PEM certificate", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", path.display());
    }
    for (i, der) in certs.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
            anyhow::anyhow!("{}: certificate {i} does not parse: {e}", path.display())
        })?;
        let uris: Vec<&str> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if i > 0 {
            println!();
        }
        println!("certificate {i}");
        println!(
            "  spiffe_id:  {}",
            if uris.is_empty() {
                "-".to_owned()
            } else {
                uris.join(", ")
            }
        );
        println!("  subject:    {}", cert.subject());
        println!("  issuer:     {}", cert.issuer());
        println!("  serial:     {}", hex(cert.raw_serial()));
        println!("  not_before: {}", cert.validity().not_before);
        println!("  not_after:  {}", cert.validity().not_after);
        println!("  ca:         {}", cert.is_ca());
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
