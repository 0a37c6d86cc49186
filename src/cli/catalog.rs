//! `ward catalog services` / `ward catalog endpoints NAME`: registered services and their
//! sidecar addresses.

use super::output::{print_json, table};
use super::{admin, Output, ServerArgs};
use anyhow::anyhow;
use serde_json::json;
use ward_config::intentions::Source;
use ward_proto::v1;

#[derive(Debug, clap::Subcommand)]
pub enum CatalogCmd {
    /// List the registered services with their instance counts.
    Services {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List the sidecar addresses of one service.
    Endpoints {
        /// The service: `svc` (namespace `default`) or `ns/svc`.
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

fn protocol_name(p: i32) -> &'static str {
    match v1::Protocol::try_from(p) {
        Ok(v1::Protocol::Tcp) => "tcp",
        Ok(v1::Protocol::Http) => "http",
        _ => "unspecified",
    }
}

/// The port of the endpoint's transparent inbound; the server sends 0 when it runs none.
fn transparent_port(e: &v1::Endpoint) -> Option<u32> {
    (e.transparent_port != 0).then_some(e.transparent_port)
}

fn namespace_of(r: &v1::ServiceRef) -> &str {
    if r.namespace.is_empty() {
        "default"
    } else {
        &r.namespace
    }
}

pub fn run(cmd: CatalogCmd) -> anyhow::Result<()> {
    match cmd {
        CatalogCmd::Services { server } => super::block_on(async move {
            let mut client = admin::connect(&server).await?;
            let resp = client
                .list_services(v1::ListServicesRequest {})
                .await
                .map_err(|s| admin::status("catalog services", s))?
                .into_inner();
            let rows: Vec<(v1::ServiceRef, &v1::ServiceSummary)> = resp
                .services
                .iter()
                .map(|s| (s.service.clone().unwrap_or_default(), s))
                .collect();
            match server.output {
                Output::Table => {
                    let rows: Vec<Vec<String>> = rows
                        .iter()
                        .map(|(r, s)| {
                            vec![
                                r.name.clone(),
                                namespace_of(r).to_owned(),
                                protocol_name(s.protocol).to_owned(),
                                s.instances.to_string(),
                                s.connected.to_string(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(
                            &["SERVICE", "NAMESPACE", "PROTOCOL", "INSTANCES", "CONNECTED"],
                            &rows
                        )
                    );
                }
                Output::Json => print_json(&json!({
                    "services": rows.iter().map(|(r, s)| json!({
                        "name": r.name,
                        "namespace": namespace_of(r),
                        "protocol": protocol_name(s.protocol),
                        "instances": s.instances,
                        "connected": s.connected,
                    })).collect::<Vec<_>>(),
                })),
            }
            anyhow::Ok(())
        })?,
        CatalogCmd::Endpoints { name, server } => {
            match Source::parse(&name) {
                Ok(Source::Service { .. }) => {}
                Ok(Source::Any) => {
                    anyhow::bail!("NAME must name a service (`svc` or `ns/svc`), not \"*\"")
                }
                Err(e) => anyhow::bail!("NAME {name:?} is not `svc` or `ns/svc`: {e}"),
            }
            super::block_on(async move {
                let mut client = admin::connect(&server).await?;
                let resp = client
                    .list_endpoints(v1::ListEndpointsRequest {
                        service: name.clone(),
                    })
                    .await
                    .map_err(|s| admin::status("catalog endpoints", s))?
                    .into_inner();
                let svc = resp
                    .service
                    .ok_or_else(|| anyhow!("catalog endpoints: the server named no service"))?;
                match server.output {
                    Output::Table => {
                        let rows: Vec<Vec<String>> = resp
                            .endpoints
                            .iter()
                            .map(|e| {
                                vec![
                                    e.address.clone(),
                                    protocol_name(e.protocol).to_owned(),
                                    if e.connected { "yes" } else { "no" }.to_owned(),
                                    transparent_port(e).map_or("-".to_owned(), |p| p.to_string()),
                                    e.instance_id.clone(),
                                ]
                            })
                            .collect();
                        println!("service: {}/{}", namespace_of(&svc), svc.name);
                        print!(
                            "{}",
                            table(
                                &[
                                    "ADDRESS",
                                    "PROTOCOL",
                                    "CONNECTED",
                                    "TRANSPARENT",
                                    "INSTANCE"
                                ],
                                &rows
                            )
                        );
                    }
                    Output::Json => print_json(&json!({
                        "service": { "name": svc.name, "namespace": namespace_of(&svc) },
                        "endpoints": resp.endpoints.iter().map(|e| json!({
                            "address": e.address,
                            "protocol": protocol_name(e.protocol),
                            "instance_id": e.instance_id,
                            "connected": e.connected,
                            "transparent_port": transparent_port(e),
                        })).collect::<Vec<_>>(),
                    })),
                }
                anyhow::Ok(())
            })?
        }
    }
}
