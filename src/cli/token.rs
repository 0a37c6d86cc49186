//! `ward token create --service NAME [--namespace NS] [--ttl D] [--uses N]`.

use super::{admin, Output, ServerArgs};
use ward_config::{Duration, Name};
use ward_proto::v1;

#[derive(Debug, clap::Subcommand)]
pub enum TokenCmd {
    /// Create a join token for one service identity; prints the token alone on stdout.
    Create {
        /// The service the token is bound to: its holder gets certificates for this name only.
        #[arg(long, value_name = "NAME", value_parser = parse_name)]
        service: Name,
        /// The service's namespace.
        #[arg(long, value_name = "NS", default_value = "default", value_parser = parse_name)]
        namespace: Name,
        /// Lifetime (default: the server's [tokens] default_ttl, 15m).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<Duration>,
        /// How many certificates it may obtain (default 1).
        #[arg(long, value_name = "N")]
        uses: Option<u32>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

pub fn parse_name(s: &str) -> Result<Name, String> {
    Name::new(s).map_err(|e| format!("{s:?} {e}"))
}

pub fn run(cmd: TokenCmd) -> anyhow::Result<()> {
    let TokenCmd::Create {
        service,
        namespace,
        ttl,
        uses,
        server,
    } = cmd;
    if uses == Some(0) {
        anyhow::bail!("--uses must be at least 1");
    }
    super::block_on(async move {
        let mut client = admin::connect(&server).await?;
        let resp = client
            .create_token(v1::CreateTokenRequest {
                service: service.to_string(),
                namespace: namespace.to_string(),
                ttl_seconds: ttl.map(|d| d.get().as_secs().max(1)).unwrap_or(0),
                uses: uses.unwrap_or(0),
            })
            .await
            .map_err(|s| admin::status("token create", s))?
            .into_inner();
        match server.output {
            Output::Table => println!("{}", resp.token),
            Output::Json => println!(
                "{}",
                serde_json::json!({
                    "token": resp.token,
                    "spiffe_id": resp.spiffe_id,
                    "expires_at": resp.expires_at,
                    "uses": resp.uses,
                })
            ),
        }
        anyhow::Ok(())
    })?
}
