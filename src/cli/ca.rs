//! `ward ca roots`: the trust domain and its CA roots (old and new during a rotation).

use super::output::{print_json, table, unix_time};
use super::{admin, Output, ServerArgs};
use serde_json::json;
use ward_proto::v1;

#[derive(Debug, clap::Subcommand)]
pub enum CaCmd {
    /// List the trust domain's roots: fingerprint, validity, and which one signs now.
    Roots {
        #[command(flatten)]
        server: ServerArgs,
    },
}

pub fn run(cmd: CaCmd) -> anyhow::Result<()> {
    let CaCmd::Roots { server } = cmd;
    super::block_on(async move {
        let mut client = admin::connect(&server).await?;
        let resp = client
            .list_roots(v1::ListRootsRequest {})
            .await
            .map_err(|s| admin::status("ca roots", s))?
            .into_inner();
        match server.output {
            Output::Table => {
                println!("trust domain: {}", resp.trust_domain);
                let rows: Vec<Vec<String>> = resp
                    .roots
                    .iter()
                    .map(|r| {
                        vec![
                            r.fingerprint.clone(),
                            unix_time(r.not_before),
                            unix_time(r.not_after),
                            if r.active { "yes" } else { "no" }.to_owned(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["FINGERPRINT (SHA-256)", "NOT BEFORE", "NOT AFTER", "ACTIVE"],
                        &rows
                    )
                );
            }
            Output::Json => print_json(&json!({
                "trust_domain": resp.trust_domain,
                "roots": resp.roots.iter().map(|r| json!({
                    "fingerprint": r.fingerprint,
                    "not_before": r.not_before,
                    "not_after": r.not_after,
                    "active": r.active,
                })).collect::<Vec<_>>(),
            })),
        }
        anyhow::Ok(())
    })?
}
