//! `ward-perf-pki DIR`: writes the load harness's PKI into DIR: `root.pem`, `intermediate.pem`,
//! and for the services `order` (client) and `inventory` (server, plus the DNS SAN
//! `inventory.ward.local` that nginx's `proxy_ssl_verify` checks): `<svc>.chain.pem` (leaf +
//! intermediate), `<svc>.key.pem` (PKCS#8) and `<svc>.bundle.pem` (chain + key, for haproxy).

use std::path::PathBuf;
use ward_perf::Pki;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .ok_or("usage: ward-perf-pki DIR")?,
    );
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::new()?;
    std::fs::write(dir.join("root.pem"), &pki.root_pem)?;
    std::fs::write(dir.join("intermediate.pem"), &pki.intermediate_pem)?;
    for (svc, dns) in [
        ("order", vec![]),
        ("inventory", vec!["inventory.ward.local"]),
        // The gRPC service of the HTTP harness.
        ("catalog", vec!["catalog.ward.local"]),
    ] {
        let leaf = pki.leaf(svc, &dns)?;
        std::fs::write(dir.join(format!("{svc}.chain.pem")), &leaf.chain_pem)?;
        std::fs::write(dir.join(format!("{svc}.key.pem")), &leaf.key_pem)?;
        std::fs::write(
            dir.join(format!("{svc}.bundle.pem")),
            format!("{}{}", leaf.chain_pem, leaf.key_pem),
        )?;
    }
    Ok(())
}
