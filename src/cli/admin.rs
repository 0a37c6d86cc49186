//! The admin connection: TLS 1.3 to a server that proves `spiffe://<td>/ward/server`, and the
//! admin token in `authorization: Bearer` on every call.

use super::ServerArgs;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use ward_control_client::channel::{ServerTarget, TargetError};
use ward_proto::v1::admin_client::AdminClient;

#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert(ward_proto::AUTHORIZATION, self.0.clone());
        Ok(req)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

/// Connects to the server named by `WARD_ADDR` / `--address`, verified with `WARD_CACERT`.
pub async fn connect(args: &ServerArgs) -> anyhow::Result<Admin> {
    let address = args.address.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "WARD_ADDR (or --address) is not set; it names the server, e.g. https://127.0.0.1:8502"
        )
    })?;
    let ca = args.ca_cert.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "WARD_CACERT (or --ca-cert) is not set; it names the PEM file of the server's CA"
        )
    })?;
    let token = admin_token(args)?;
    let target = ServerTarget::parse(address, ca, None).map_err(|e| match e {
        TargetError::Address(m) => anyhow::anyhow!("WARD_ADDR: {m}"),
        TargetError::CaFile(m) => anyhow::anyhow!("WARD_CACERT: {}: {m}", ca.display()),
    })?;
    let channel = target.connect(None).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the server at {address}: {}",
            source_chain(&e)
        )
    })?;
    let bearer = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| anyhow::anyhow!("the admin token holds characters a header cannot carry"))?;
    Ok(AdminClient::with_interceptor(channel, Bearer(bearer))
        .max_decoding_message_size(ward_proto::MAX_MESSAGE_SIZE))
}

/// The admin token: from `--token-file` when given, else `--token` / `WARD_TOKEN`. Checked
/// before any network call.
fn admin_token(args: &ServerArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--token-file {}: cannot read: {e}", path.display()))?;
        let token = text.trim_end_matches(['\n', '\r']);
        if token.trim().is_empty() {
            anyhow::bail!("--token-file {}: is empty", path.display());
        }
        return Ok(token.to_owned());
    }
    args.token
        .clone()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!("WARD_TOKEN (or --token-file) is not set; it holds the admin token")
        })
}

/// A gRPC failure as one sentence.
pub fn status(what: &str, s: tonic::Status) -> anyhow::Error {
    let code = match s.code() {
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::Unavailable => "server unavailable",
        tonic::Code::FailedPrecondition => "refused",
        _ => "failed",
    };
    anyhow::anyhow!("{what}: {code}: {}", s.message())
}

fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    super::error_line(std::iter::successors(Some(e), |e| e.source()))
}
