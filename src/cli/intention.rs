//! `ward intention create|delete|list|check`.
//!
//! Names are checked here (security rule 7, names, docs/security.md) before any network call,
//! so a bad `--source` or `--destination` is one sentence naming the flag. `create --file` reads
//! the L7 form (docs/cli.md, "ward intention"):
//!
//! ```toml
//! permissions = [
//!   { action = "allow", path_prefix = "/stock/", methods = ["GET"] },
//!   { action = "deny", path_exact = "/admin", headers = [{ name = "x-env", exact = "prod" }] },
//! ]
//! ```
//!
//! Unknown keys are refused, naming the file and the key.

use super::output::{print_json, table, unix_time};
use super::{admin, Output, ServerArgs};
use anyhow::anyhow;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use ward_config::intentions::{Action, Source};
use ward_config::permission::{PermissionError, Problem, RawRule};
use ward_proto::v1;
use ward_proxy::l7::authorize::{CompiledPermissions, Decision};
use ward_proxy::l7::path::{normalize, Rejection};

#[derive(Debug, clap::Subcommand)]
pub enum IntentionCmd {
    /// Create an intention: an L4 rule with --action, or an L7 rule with --file.
    Create {
        /// The caller: `*`, `svc` (in the destination's namespace) or `ns/svc`.
        #[arg(long, value_name = "SOURCE")]
        source: String,
        /// The called service: `svc` (namespace `default`) or `ns/svc`.
        #[arg(long, value_name = "DESTINATION")]
        destination: String,
        /// `allow` or `deny` (an L4 rule, decided on the handshake).
        #[arg(
            long,
            value_name = "allow|deny",
            required_unless_present = "file",
            conflicts_with = "file"
        )]
        action: Option<String>,
        /// A TOML file of ordered L7 permissions (an L7 rule, for an http destination).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Replace an existing intention for the same source and destination.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete the intention from a source to a destination.
    Delete {
        /// `*`, `svc` or `ns/svc`.
        #[arg(long, value_name = "SOURCE")]
        source: String,
        /// `svc` or `ns/svc`.
        #[arg(long, value_name = "DESTINATION")]
        destination: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List intentions, optionally only those of one destination.
    List {
        /// Only the intentions of this destination: `svc` or `ns/svc`.
        #[arg(long, value_name = "DESTINATION")]
        destination: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Decide for a concrete caller: prints the decision and the rule that made it; with
    /// --path, also the request against an L7 rule and the permission that decided it.
    Check {
        /// A concrete caller: `svc` or `ns/svc` (`*` is not a caller).
        #[arg(long, value_name = "SOURCE")]
        source: String,
        /// `svc` or `ns/svc`.
        #[arg(long, value_name = "DESTINATION")]
        destination: String,
        /// The request's method, for an L7 rule (default GET).
        #[arg(long, value_name = "METHOD", requires = "path")]
        method: Option<String>,
        /// The request's path (and query) as a client sends it, for an L7 rule: normalized and
        /// matched as the proxy does.
        #[arg(long, value_name = "PATH")]
        path: Option<String>,
        /// A request header `name: value`, for an L7 rule; repeat for more.
        #[arg(long = "header", value_name = "NAME: VALUE", requires = "path")]
        headers: Vec<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Runs one intention command. `check` answers in its exit code too, as `consul intention
/// check` does: 0 allow, 1 deny (errors are 2, see `main`); every other command exits 0.
pub fn run(cmd: IntentionCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        IntentionCmd::Create {
            source,
            destination,
            action,
            file,
            replace,
            server,
        } => {
            check_source(&source)?;
            check_destination(&destination)?;
            let (action, permissions) = match (&action, &file) {
                (Some(a), None) => (parse_action(a)?, Vec::new()),
                (None, Some(path)) => (
                    v1::Action::Unspecified,
                    load_permissions(path, &source, &destination)?,
                ),
                // clap enforces exactly one of them.
                _ => anyhow::bail!("give either --action or --file"),
            };
            let request = v1::CreateIntentionRequest {
                intention: Some(v1::Intention {
                    source,
                    destination,
                    action: action as i32,
                    permissions,
                    ..Default::default()
                }),
                replace,
            };
            super::block_on(async move {
                let mut client = admin::connect(&server).await?;
                let resp = client
                    .create_intention(request)
                    .await
                    .map_err(|s| match s.code() {
                        // The one way forward: say it.
                        tonic::Code::AlreadyExists => anyhow!(
                            "intention create: already exists: {}; add --replace to overwrite it",
                            s.message()
                        ),
                        _ => grpc_error("intention create", s),
                    })?
                    .into_inner();
                let stored = resp.intention.unwrap_or_default();
                match server.output {
                    Output::Table => println!(
                        "intention {} -> {} ({}) written at version {}",
                        stored.source,
                        stored.destination,
                        rule_kind(&stored),
                        resp.version
                    ),
                    Output::Json => print_json(&json!({
                        "version": resp.version,
                        "intention": intention_json(&stored),
                    })),
                }
                anyhow::Ok(())
            })?
            .map(|()| ExitCode::SUCCESS)
        }
        IntentionCmd::Delete {
            source,
            destination,
            server,
        } => {
            check_source(&source)?;
            check_destination(&destination)?;
            super::block_on(async move {
                let mut client = admin::connect(&server).await?;
                let resp = client
                    .delete_intention(v1::DeleteIntentionRequest {
                        source: source.clone(),
                        destination: destination.clone(),
                    })
                    .await
                    .map_err(|s| grpc_error("intention delete", s))?
                    .into_inner();
                match server.output {
                    Output::Table => println!(
                        "intention {source} -> {destination} deleted at version {}",
                        resp.version
                    ),
                    Output::Json => print_json(&json!({ "version": resp.version })),
                }
                anyhow::Ok(())
            })?
            .map(|()| ExitCode::SUCCESS)
        }
        IntentionCmd::List {
            destination,
            server,
        } => {
            if let Some(d) = &destination {
                check_destination(d)?;
            }
            super::block_on(async move {
                let mut client = admin::connect(&server).await?;
                let resp = client
                    .list_intentions(v1::ListIntentionsRequest {
                        destination: destination.unwrap_or_default(),
                    })
                    .await
                    .map_err(|s| grpc_error("intention list", s))?
                    .into_inner();
                let default = action_name(resp.default_action);
                match server.output {
                    Output::Table => {
                        let rows: Vec<Vec<String>> = resp
                            .intentions
                            .iter()
                            .map(|i| {
                                vec![
                                    i.source.clone(),
                                    i.destination.clone(),
                                    rule_kind(i),
                                    i.version.to_string(),
                                    unix_time(i.created_at),
                                ]
                            })
                            .collect();
                        print!(
                            "{}",
                            table(
                                &["SOURCE", "DESTINATION", "ACTION", "VERSION", "CREATED"],
                                &rows
                            )
                        );
                        println!(
                            "default policy: {default} (intentions version {})",
                            resp.version
                        );
                    }
                    Output::Json => print_json(&json!({
                        "version": resp.version,
                        "default_action": default,
                        "intentions": resp.intentions.iter().map(intention_json).collect::<Vec<_>>(),
                    })),
                }
                anyhow::Ok(())
            })?.map(|()| ExitCode::SUCCESS)
        }
        IntentionCmd::Check {
            source,
            destination,
            method,
            path,
            headers,
            server,
        } => {
            if source == "*" {
                anyhow::bail!(
                    "--source \"*\" is not a caller; check a concrete service (`svc` or `ns/svc`)"
                );
            }
            check_source(&source)?;
            check_destination(&destination)?;
            let request = path
                .map(|p| parse_request(method.as_deref().unwrap_or("GET"), p, &headers))
                .transpose()?;
            super::block_on(async move {
                let mut client = admin::connect(&server).await?;
                let resp = client
                    .check_intention(v1::CheckIntentionRequest {
                        source,
                        destination,
                    })
                    .await
                    .map_err(|s| grpc_error("intention check", s))?
                    .into_inner();
                // An L7 rule admits the connection; the request is then decided here as the
                // proxy decides it.
                let l7 = match (&request, &resp.rule) {
                    (Some(req), Some(rule))
                        if !rule.permissions.is_empty()
                            && resp.decision == v1::Action::Allow as i32 =>
                    {
                        Some(decide_l7(&rule.permissions, req)?)
                    }
                    _ => None,
                };
                let (decision, code) = match &l7 {
                    Some(o) if o.allows() => ("allow", Ok(ExitCode::SUCCESS)),
                    Some(_) => ("deny", Ok(ExitCode::from(1))),
                    // Fail closed: only an explicit allow exits 0.
                    None => match v1::Action::try_from(resp.decision) {
                        Ok(v1::Action::Allow) => ("allow", Ok(ExitCode::SUCCESS)),
                        Ok(v1::Action::Deny) => ("deny", Ok(ExitCode::from(1))),
                        _ => (
                            "unspecified",
                            Err(anyhow!(
                                "intention check: the server answered no decision (allow or deny)"
                            )),
                        ),
                    },
                };
                let perms = resp
                    .rule
                    .as_ref()
                    .map(|r| r.permissions.as_slice())
                    .unwrap_or(&[]);
                match server.output {
                    Output::Table => {
                        let rule = match &resp.rule {
                            Some(r) => format!(
                                "{} -> {} {} (version {})",
                                r.source,
                                r.destination,
                                rule_kind(r),
                                r.version
                            ),
                            None => "default policy".to_owned(),
                        };
                        let mut rows = vec![
                            vec!["decision".to_owned(), decision.to_owned()],
                            vec!["rule".to_owned(), rule],
                        ];
                        if let Some(o) = &l7 {
                            rows.push(vec!["path".to_owned(), o.path_text()]);
                            rows.push(vec!["permission".to_owned(), o.permission_text(perms)]);
                        }
                        rows.push(vec!["reason".to_owned(), resp.reason.clone()]);
                        rows.push(vec!["version".to_owned(), resp.version.to_string()]);
                        print!("{}", table(&[], &rows));
                    }
                    Output::Json => {
                        let mut j = json!({
                            "decision": decision,
                            "rule": resp.rule.as_ref().map(intention_json),
                            "default_policy": resp.rule.is_none(),
                            "reason": resp.reason,
                            "version": resp.version,
                        });
                        if let Some(o) = &l7 {
                            j["request"] = o.json(perms);
                        }
                        print_json(&j);
                    }
                }
                code
            })?
        }
    }
}

// ---- argument checks (before any network call) ---------------------------------------------

fn check_source(s: &str) -> anyhow::Result<()> {
    Source::parse(s)
        .map(|_| ())
        .map_err(|e| anyhow!("--source {s:?} is not `*`, `svc` or `ns/svc`: {e}"))
}

fn check_destination(s: &str) -> anyhow::Result<()> {
    match Source::parse(s) {
        Ok(Source::Any) => Err(anyhow!(
            "--destination must name a service (`svc` or `ns/svc`), not \"*\""
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(anyhow!("--destination {s:?} is not `svc` or `ns/svc`: {e}")),
    }
}

fn parse_action(s: &str) -> anyhow::Result<v1::Action> {
    match Action::parse(s) {
        Some(Action::Allow) => Ok(v1::Action::Allow),
        Some(Action::Deny) => Ok(v1::Action::Deny),
        None => Err(anyhow!("--action {s:?} must be allow or deny")),
    }
}

/// A gRPC failure as one sentence; the codes `admin::status` has no word for are named here.
fn grpc_error(what: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::FailedPrecondition => anyhow!("{what}: refused: {}", s.message()),
        _ => admin::status(what, s),
    }
}

// ---- an L7 request ----------------------------------------------------------------------------

/// The request `check --path` decides against an L7 rule.
#[derive(Debug)]
struct L7Request {
    method: http::Method,
    target: String,
    headers: http::HeaderMap,
}

fn parse_request(method: &str, target: String, headers: &[String]) -> anyhow::Result<L7Request> {
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| anyhow!("--method {method:?} is not an HTTP method"))?;
    let mut map = http::HeaderMap::new();
    for h in headers {
        let parsed = h.split_once(':').and_then(|(name, value)| {
            Some((
                http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                http::HeaderValue::from_str(value.trim()).ok()?,
            ))
        });
        let (name, value) = parsed.ok_or_else(|| anyhow!("--header {h:?} is not `name: value`"))?;
        map.append(name, value);
    }
    Ok(L7Request {
        method,
        target,
        headers: map,
    })
}

/// What the proxy does with the request under an L7 rule.
#[derive(Debug, PartialEq)]
enum L7Outcome {
    /// Refused before any permission is tried: the proxy answers 400 (414 for a long path).
    Refused(Rejection),
    /// The normalized path, as matched and forwarded, and the decision.
    Decided { path: String, decision: Decision },
}

/// Decides the request with the proxy's own code: the path normalized, then the permissions in
/// order, first match wins, no match denies.
fn decide_l7(perms: &[v1::Permission], req: &L7Request) -> anyhow::Result<L7Outcome> {
    let bad = |e: &dyn std::fmt::Display| {
        anyhow!("intention check: the server sent permissions this CLI cannot enforce: {e}")
    };
    let checked = ward_proto::permission::parse(perms).map_err(|e| bad(&e))?;
    let compiled = CompiledPermissions::compile(&checked).map_err(|e| bad(&e))?;
    Ok(match normalize(&req.target) {
        Err(r) => L7Outcome::Refused(r),
        Ok(n) => L7Outcome::Decided {
            path: n.path().to_owned(),
            decision: compiled.decide(&req.method, n.path(), &req.headers),
        },
    })
}

impl L7Outcome {
    fn allows(&self) -> bool {
        matches!(self, L7Outcome::Decided { decision, .. } if decision.is_allow())
    }

    fn path_text(&self) -> String {
        match self {
            L7Outcome::Refused(r) => format!("refused with {}: {r}", r.status().as_u16()),
            L7Outcome::Decided { path, .. } => path.clone(),
        }
    }

    /// `#1 {"action":"allow",...}`, or why none decided.
    fn permission_text(&self, perms: &[v1::Permission]) -> String {
        match self {
            L7Outcome::Refused(_) => "none (the path is refused before matching)".to_owned(),
            L7Outcome::Decided { decision, .. } => match decision.permission {
                Some(i) => format!(
                    "#{i} {}",
                    perms.get(i).map(permission_json).unwrap_or(Value::Null)
                ),
                None => "none matched (a request no permission matches is denied)".to_owned(),
            },
        }
    }

    fn json(&self, perms: &[v1::Permission]) -> Value {
        match self {
            L7Outcome::Refused(r) => json!({
                "refused": r.to_string(),
                "status": r.status().as_u16(),
            }),
            L7Outcome::Decided { path, decision } => json!({
                "path": path,
                "permission_index": decision.permission,
                "permission": decision.permission.and_then(|i| perms.get(i)).map(permission_json),
            }),
        }
    }
}

// ---- the L7 file ---------------------------------------------------------------------------

/// Reads `--file`: the ordered permissions of an L7 rule, checked as the server checks them.
fn load_permissions(
    path: &Path,
    source: &str,
    destination: &str,
) -> anyhow::Result<Vec<v1::Permission>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("--file: cannot read {}: {e}", path.display()))?;
    permissions_of(&text, source, destination)
        .map_err(|e| anyhow!("--file: {}: {e}", path.display()))
}

fn permissions_of(
    text: &str,
    source: &str,
    destination: &str,
) -> Result<Vec<v1::Permission>, PermissionError> {
    let rule = RawRule::from_toml(text)?;
    if let Some(s) = &rule.source {
        let same = matches!(
            (canonical(s, destination), canonical(source, destination)),
            (Some(a), Some(b)) if a == b
        );
        if !same {
            return Err(PermissionError {
                key: "source".into(),
                problem: Problem::OtherSource {
                    written: s.clone(),
                    given: source.to_owned(),
                },
            });
        }
    }
    Ok(rule
        .permissions()?
        .iter()
        .map(ward_proto::permission::to_proto)
        .collect())
}

/// `source` as stored: a service in the destination's namespace loses its `ns/`.
fn canonical(source: &str, destination: &str) -> Option<Source> {
    let dest_ns = match destination.split_once('/') {
        Some((ns, _)) => ns,
        None => "default",
    };
    Some(match Source::parse(source).ok()? {
        Source::Service {
            namespace: Some(ns),
            name,
        } if ns.as_str() == dest_ns => Source::Service {
            namespace: None,
            name,
        },
        other => other,
    })
}

// ---- rendering -----------------------------------------------------------------------------

pub(super) fn action_name(a: i32) -> &'static str {
    match v1::Action::try_from(a) {
        Ok(v1::Action::Allow) => "allow",
        Ok(v1::Action::Deny) => "deny",
        _ => "unspecified",
    }
}

/// `allow`, `deny`, or `l7 (N permissions)`.
fn rule_kind(i: &v1::Intention) -> String {
    if i.permissions.is_empty() {
        action_name(i.action).to_owned()
    } else {
        let n = i.permissions.len();
        format!("l7 ({n} permission{})", if n == 1 { "" } else { "s" })
    }
}

fn intention_json(i: &v1::Intention) -> Value {
    json!({
        "source": i.source,
        "destination": i.destination,
        "action": if i.permissions.is_empty() { Value::from(action_name(i.action)) } else { Value::Null },
        "permissions": i.permissions.iter().map(permission_json).collect::<Vec<_>>(),
        "version": i.version,
        "created_at": i.created_at,
    })
}

/// The same shape as the TOML form.
fn permission_json(p: &v1::Permission) -> Value {
    serde_json::to_value(ward_proto::permission::to_raw(p)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<v1::Permission>, PermissionError> {
        permissions_of(text, "order", "inventory")
    }

    #[test]
    fn l7_file_maps_to_permissions() {
        let p = parse(
            r#"source = "order"
permissions = [
  { action = "allow", path_prefix = "/stock/", methods = ["GET"] },
  { action = "deny", path_exact = "/admin", headers = [{ name = "x-env", exact = "prod" }, { name = "x-a", present = true }] },
]"#,
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].action, v1::Action::Allow as i32);
        assert_eq!(
            p[0].path,
            Some(v1::permission::Path::PathPrefix("/stock/".into()))
        );
        assert_eq!(p[0].methods, vec!["GET".to_owned()]);
        assert_eq!(p[1].action, v1::Action::Deny as i32);
        assert_eq!(p[1].headers.len(), 2);
        assert_eq!(
            p[1].headers[0].r#match,
            Some(v1::header_match::Match::Exact("prod".into()))
        );
        let j = permission_json(&p[1]);
        assert_eq!(j["path_exact"], "/admin");
        assert_eq!(j["headers"][1]["present"], true);
    }

    #[test]
    fn l7_file_errors_name_the_key() {
        let cases = [
            ("permissions = [{ action = \"allow\", paht = \"/\" }]", "permissions[0].paht"),
            ("permissions = [{ path_prefix = \"/\" }]", "permissions[0].action"),
            ("permissions = [{ action = \"maybe\" }]", "permissions[0].action"),
            (
                "permissions = [{ action = \"allow\", path_exact = \"/a\", path_prefix = \"/b\" }]",
                "permissions[0].path_",
            ),
            ("permissions = [{ action = \"allow\", methods = [\"get\"] }]", "permissions[0].methods[0]"),
            (
                "permissions = [{ action = \"allow\", headers = [{ name = \"x\", regex = \"y\" }] }]",
                "permissions[0].headers[0].regex",
            ),
            (
                "permissions = [{ action = \"allow\", headers = [{ name = \"x\" }] }]",
                "permissions[0].headers[0]",
            ),
            ("permissions = []", "permissions"),
            ("rules = []", "rules"),
            ("action = \"allow\"", "action"),
            ("source = \"web\"\npermissions = [{ action = \"allow\" }]", "source"),
        ];
        for (text, key) in cases {
            let k = parse(text).expect_err(text).key;
            assert!(k.starts_with(key), "{text}: key {k}, want {key}");
        }
        assert!(
            parse("source = \"default/order\"\npermissions = [{ action = \"allow\" }]").is_ok()
        );
    }

    /// `check --path` decides an L7 rule as the proxy does: normalized path, first match wins,
    /// no match denies, and the permission that decided is named.
    #[test]
    fn l7_check_names_the_permission_that_decided() {
        use ward_config::intentions::Action::{Allow, Deny};
        let perms = parse(
            r#"permissions = [
  { action = "deny", path_prefix = "/stock/secret" },
  { action = "allow", path_prefix = "/stock/", methods = ["GET"] },
  { action = "deny", path_exact = "/admin", headers = [{ name = "x-env", exact = "prod" }] },
  { action = "allow", path_regex = "/admin|/health" },
]"#,
        )
        .unwrap();
        let decided = |method: &str, path: &str, headers: &[&str]| {
            let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
            let req = parse_request(method, path.to_owned(), &headers).unwrap();
            decide_l7(&perms, &req).unwrap()
        };
        let at = |path: &str, permission: Option<usize>, action| L7Outcome::Decided {
            path: path.to_owned(),
            decision: Decision { action, permission },
        };
        let cases = [
            ("GET", "/stock/1", &[][..], at("/stock/1", Some(1), Allow)),
            ("GET", "/stock/1?all=1", &[], at("/stock/1", Some(1), Allow)),
            ("POST", "/stock/1", &[], at("/stock/1", None, Deny)),
            (
                "GET",
                "/stock//secret/1",
                &[],
                at("/stock/secret/1", Some(0), Deny),
            ),
            (
                "GET",
                "/stock/../admin",
                &["x-env: prod"],
                at("/admin", Some(2), Deny),
            ),
            (
                "GET",
                "/%61dmin",
                &["X-Env:prod"],
                at("/admin", Some(2), Deny),
            ),
            (
                "GET",
                "/admin",
                &["x-env: dev"],
                at("/admin", Some(3), Allow),
            ),
            ("GET", "/ADMIN", &[], at("/ADMIN", None, Deny)),
            ("GET", "/admin/", &[], at("/admin/", None, Deny)),
            (
                "GET",
                "/stock%2F..%2Fadmin",
                &[],
                L7Outcome::Refused(Rejection::EncodedSeparator),
            ),
        ];
        for (method, path, headers, want) in cases {
            let got = decided(method, path, headers);
            assert_eq!(got, want, "{method} {path} {headers:?}");
            assert_eq!(
                got.allows(),
                matches!(want, L7Outcome::Decided { decision, .. } if decision.is_allow())
            );
        }
        let text = decided("GET", "/stock/1", &[]).permission_text(&perms);
        assert_eq!(
            text,
            r#"#1 {"action":"allow","headers":[],"methods":["GET"],"path_prefix":"/stock/"}"#
        );
        let refused = decided("GET", "/a#b", &[]);
        assert!(!refused.allows());
        assert_eq!(
            refused.path_text(),
            "refused with 400: the request target has a fragment ('#')"
        );
        let j = decided("GET", "/stock/secret", &[]).json(&perms);
        assert_eq!(j["permission_index"], 0);
        assert_eq!(j["permission"]["path_prefix"], "/stock/secret");
    }

    #[test]
    fn l7_request_flags_are_checked() {
        let e = parse_request("GE T", "/".into(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--method \"GE T\""), "{e}");
        let e = parse_request("GET", "/".into(), &["x-env".into()])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--header \"x-env\""), "{e}");
        let r = parse_request("PATCH", "/".into(), &["X-A: 1".into(), "x-a:2".into()]).unwrap();
        assert_eq!(r.method, http::Method::PATCH);
        assert_eq!(r.headers.get_all("x-a").iter().count(), 2);
    }

    #[test]
    fn names_are_checked_with_the_flag() {
        let e = check_source("Order_1").unwrap_err().to_string();
        assert!(e.starts_with("--source \"Order_1\""), "{e}");
        assert!(check_source("*").is_ok());
        assert!(check_source("prod/web").is_ok());
        assert!(check_destination("*")
            .unwrap_err()
            .to_string()
            .contains("--destination"));
        assert!(check_destination("a/b/c").is_err());
        assert!(parse_action("permit")
            .unwrap_err()
            .to_string()
            .contains("--action"));
    }

    /// The CLI refuses exactly what the server refuses: a path over 1024 bytes passed the
    /// CLI and was refused by the server, and `present = false` the other way round.
    #[test]
    fn cli_and_server_agree_on_permissions() {
        use v1::header_match::Match as M;
        use v1::permission::Path as P;
        use ward_control_plane::intentions::Intention;
        let long = format!("/{}", "a".repeat(1024));
        let allow = |path: Option<P>, headers: Vec<v1::HeaderMatch>| v1::Permission {
            action: v1::Action::Allow as i32,
            path,
            methods: vec![],
            headers,
        };
        let header = |m: M| {
            vec![v1::HeaderMatch {
                name: "x-env".into(),
                r#match: Some(m),
            }]
        };
        let cases = [
            (
                format!("{{ action = \"allow\", path_prefix = \"{long}\" }}"),
                allow(Some(P::PathPrefix(long.clone())), vec![]),
            ),
            (
                format!("{{ action = \"allow\", path_regex = \"{long}\" }}"),
                allow(Some(P::PathRegex(long.clone())), vec![]),
            ),
            (
                "{ action = \"allow\", headers = [{ name = \"x-env\", present = false }] }".into(),
                allow(None, header(M::Present(false))),
            ),
            (
                "{ action = \"allow\", path_prefix = \"/stock/\", headers = [{ name = \"x-env\", present = true }] }".into(),
                allow(Some(P::PathPrefix("/stock/".into())), header(M::Present(true))),
            ),
        ];
        for (text, proto) in cases {
            let cli = parse(&format!("permissions = [{text}]")).is_ok();
            let rule = v1::Intention {
                source: "order".into(),
                destination: "inventory".into(),
                permissions: vec![proto],
                ..Default::default()
            };
            let server = Intention::from_proto(&rule, |_| true).is_ok();
            assert_eq!(cli, server, "CLI and server disagree on {text:.80}");
        }
    }
}
