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
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use ward_config::intentions::{Action, Source};
use ward_proto::v1;

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
    /// Decide for a concrete caller: prints the decision and the rule that made it.
    Check {
        /// A concrete caller: `svc` or `ns/svc` (`*` is not a caller).
        #[arg(long, value_name = "SOURCE")]
        source: String,
        /// `svc` or `ns/svc`.
        #[arg(long, value_name = "DESTINATION")]
        destination: String,
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
            server,
        } => {
            if source == "*" {
                anyhow::bail!(
                    "--source \"*\" is not a caller; check a concrete service (`svc` or `ns/svc`)"
                );
            }
            check_source(&source)?;
            check_destination(&destination)?;
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
                let decision = action_name(resp.decision);
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
                        let rows = vec![
                            vec!["decision".to_owned(), decision.to_owned()],
                            vec!["rule".to_owned(), rule],
                            vec!["reason".to_owned(), resp.reason.clone()],
                            vec!["version".to_owned(), resp.version.to_string()],
                        ];
                        print!("{}", table(&[], &rows));
                    }
                    Output::Json => print_json(&json!({
                        "decision": decision,
                        "rule": resp.rule.as_ref().map(intention_json),
                        "default_policy": resp.rule.is_none(),
                        "reason": resp.reason,
                        "version": resp.version,
                    })),
                }
                // Fail closed: only an explicit allow exits 0.
                match v1::Action::try_from(resp.decision) {
                    Ok(v1::Action::Allow) => Ok(ExitCode::SUCCESS),
                    Ok(v1::Action::Deny) => Ok(ExitCode::from(1)),
                    _ => Err(anyhow!(
                        "intention check: the server answered no decision (allow or deny)"
                    )),
                }
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

// ---- the L7 file ---------------------------------------------------------------------------

/// Reads `--file`: the ordered permissions of an L7 rule.
fn load_permissions(
    path: &Path,
    source: &str,
    destination: &str,
) -> anyhow::Result<Vec<v1::Permission>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("--file: cannot read {}: {e}", path.display()))?;
    let doc: Value =
        ward_config::error::parse_toml(path, &text).map_err(|e| anyhow!("--file: {e}"))?;
    permissions_of(&doc, source, destination)
        .map_err(|(key, msg)| anyhow!("--file: {}: key `{key}`: {msg}", path.display()))
}

/// A key path and what is wrong with it.
type KeyError = (String, String);

fn permissions_of(
    doc: &Value,
    source: &str,
    destination: &str,
) -> Result<Vec<v1::Permission>, KeyError> {
    let err = |k: &str, m: &str| (k.to_owned(), m.to_owned());
    let top = doc
        .as_object()
        .ok_or_else(|| err("permissions", "the file must be a TOML table"))?;
    for (k, v) in top {
        match k.as_str() {
            "permissions" => {}
            "source" => {
                let s = v.as_str().ok_or_else(|| err("source", "must be a string"))?;
                let same = matches!(
                    (canonical(s, destination), canonical(source, destination)),
                    (Some(a), Some(b)) if a == b
                );
                if !same {
                    return Err(err(
                        "source",
                        &format!("{s:?} does not match --source {source:?}"),
                    ));
                }
            }
            "action" => {
                return Err(err(
                    "action",
                    "a file holds an L7 rule (permissions); for an L4 rule use --action instead of --file",
                ))
            }
            other => {
                return Err(err(
                    other,
                    "unknown key; the file holds `permissions` (and optionally `source`)",
                ))
            }
        }
    }
    let list = top
        .get("permissions")
        .ok_or_else(|| {
            err(
                "permissions",
                "is missing; an L7 rule needs a list of permissions",
            )
        })?
        .as_array()
        .ok_or_else(|| err("permissions", "must be an array of tables"))?;
    if list.is_empty() {
        return Err(err("permissions", "must hold at least one permission"));
    }
    list.iter()
        .enumerate()
        .map(|(n, p)| permission(&format!("permissions[{n}]"), p))
        .collect()
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

fn permission(at: &str, p: &Value) -> Result<v1::Permission, KeyError> {
    let err = |k: &str, m: &str| (format!("{at}{k}"), m.to_owned());
    let table = p.as_object().ok_or_else(|| err("", "must be a table"))?;
    let mut out = v1::Permission::default();
    let mut action = None;
    let mut path_key: Option<&str> = None;
    for (k, v) in table {
        let key = format!(".{k}");
        match k.as_str() {
            "action" => {
                let s = v.as_str().ok_or_else(|| err(&key, "must be a string"))?;
                action = Some(match Action::parse(s) {
                    Some(Action::Allow) => v1::Action::Allow,
                    Some(Action::Deny) => v1::Action::Deny,
                    None => return Err(err(&key, &format!("{s:?} must be allow or deny"))),
                });
            }
            "path_exact" | "path_prefix" | "path_regex" => {
                if let Some(first) = path_key {
                    return Err(err(
                        &key,
                        &format!("a permission has at most one path matcher, and `{first}` is already set"),
                    ));
                }
                path_key = Some(k.as_str());
                let s = v
                    .as_str()
                    .ok_or_else(|| err(&key, "must be a string"))?
                    .to_owned();
                if k != "path_regex" && !s.starts_with('/') {
                    return Err(err(&key, &format!("{s:?} must start with '/'")));
                }
                if s.is_empty() {
                    return Err(err(&key, "must not be empty"));
                }
                use v1::permission::Path as P;
                out.path = Some(match k.as_str() {
                    "path_exact" => P::PathExact(s),
                    "path_prefix" => P::PathPrefix(s),
                    _ => P::PathRegex(s),
                });
            }
            "methods" => {
                let list = v
                    .as_array()
                    .ok_or_else(|| err(&key, "must be an array of strings"))?;
                for (i, m) in list.iter().enumerate() {
                    let mkey = format!("{key}[{i}]");
                    let m = m.as_str().ok_or_else(|| err(&mkey, "must be a string"))?;
                    if m.is_empty() || m.len() > 32 || !m.bytes().all(|c| c.is_ascii_uppercase())
                    {
                        return Err(err(
                            &mkey,
                            &format!("{m:?} must be an upper-case HTTP method such as \"GET\""),
                        ));
                    }
                    out.methods.push(m.to_owned());
                }
            }
            "headers" => {
                let list = v
                    .as_array()
                    .ok_or_else(|| err(&key, "must be an array of tables"))?;
                for (i, h) in list.iter().enumerate() {
                    out.headers
                        .push(header(&format!("{at}{key}[{i}]"), h)?);
                }
            }
            _ => {
                return Err(err(
                    &key,
                    "unknown key; a permission has action, path_exact | path_prefix | path_regex, methods, headers",
                ))
            }
        }
    }
    out.action = action.ok_or_else(|| err(".action", "is missing: allow or deny"))? as i32;
    Ok(out)
}

fn header(at: &str, h: &Value) -> Result<v1::HeaderMatch, KeyError> {
    use v1::header_match::Match as M;
    let err = |k: &str, m: &str| (format!("{at}{k}"), m.to_owned());
    let table = h.as_object().ok_or_else(|| err("", "must be a table"))?;
    let mut out = v1::HeaderMatch::default();
    let mut name = None;
    for (k, v) in table {
        let key = format!(".{k}");
        let matcher = match k.as_str() {
            "name" => {
                let s = v.as_str().ok_or_else(|| err(&key, "must be a string"))?;
                let ok = !s.is_empty()
                    && s.len() <= 256
                    && s.bytes().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_'
                    });
                if !ok {
                    return Err(err(
                        &key,
                        &format!("{s:?} must be a lower-case header name"),
                    ));
                }
                name = Some(s.to_owned());
                None
            }
            "exact" | "prefix" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| err(&key, "must be a string"))?
                    .to_owned();
                Some(if k == "exact" {
                    M::Exact(s)
                } else {
                    M::Prefix(s)
                })
            }
            "present" => match v.as_bool() {
                Some(true) => Some(M::Present(true)),
                // What `present = false` should mean is not defined; refuse it rather than
                // guess (a rule the proxy cannot enforce as written fails closed there anyway).
                Some(false) => return Err(err(
                    &key,
                    "only `present = true` is supported; leave the header out to not require it",
                )),
                None => return Err(err(&key, "must be true")),
            },
            _ => {
                return Err(err(
                    &key,
                    "unknown key; a header match has name and one of exact, prefix, present",
                ))
            }
        };
        if let Some(m) = matcher {
            if out.r#match.is_some() {
                return Err(err(
                    &key,
                    "a header match has exactly one of exact, prefix, present",
                ));
            }
            out.r#match = Some(m);
        }
    }
    out.name = name.ok_or_else(|| err(".name", "is missing"))?;
    if out.r#match.is_none() {
        return Err(err("", "needs one of exact, prefix, present"));
    }
    Ok(out)
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
    use v1::header_match::Match as M;
    use v1::permission::Path as P;
    let mut m = Map::new();
    m.insert("action".into(), action_name(p.action).into());
    match &p.path {
        Some(P::PathExact(s)) => m.insert("path_exact".into(), s.as_str().into()),
        Some(P::PathPrefix(s)) => m.insert("path_prefix".into(), s.as_str().into()),
        Some(P::PathRegex(s)) => m.insert("path_regex".into(), s.as_str().into()),
        None => None,
    };
    m.insert("methods".into(), p.methods.clone().into());
    let headers: Vec<Value> = p
        .headers
        .iter()
        .map(|h| {
            let mut o = Map::new();
            o.insert("name".into(), h.name.as_str().into());
            match &h.r#match {
                Some(M::Exact(s)) => o.insert("exact".into(), s.as_str().into()),
                Some(M::Prefix(s)) => o.insert("prefix".into(), s.as_str().into()),
                Some(M::Present(b)) => o.insert("present".into(), (*b).into()),
                None => None,
            };
            Value::Object(o)
        })
        .collect();
    m.insert("headers".into(), headers.into());
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<v1::Permission>, KeyError> {
        let doc: Value = ward_config::error::parse_toml(Path::new("l7.toml"), text).unwrap();
        permissions_of(&doc, "order", "inventory")
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
            let (k, _) = parse(text).expect_err(text);
            assert!(k.starts_with(key), "{text}: key {k}, want {key}");
        }
        assert!(
            parse("source = \"default/order\"\npermissions = [{ action = \"allow\" }]").is_ok()
        );
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
}
