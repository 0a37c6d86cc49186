//! The metrics as a Prometheus server sees them: `promtool check metrics` accepts every
//! `/metrics` (two sidecars and `ward server`), and a real `prometheus` scraping them answers
//! `up` and a handshake p99 aggregated across the sidecars from the histogram buckets.
//!
//! Both tools come from Debian's `prometheus` package (`.ci/run` installs it); where one is
//! missing the test prints `SKIPPED:` and returns.

use ward_test_support as common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::cp::{metric, Mesh};
use common::net::{free_port, http_get};
use common::proc::TempDir;
use common::tls::{probe, ServerCheck};
use common::{tool_available, wait_until};

/// Whether `tool --version` runs; says SKIPPED otherwise.
fn installed(tool: &str) -> bool {
    tool_available(tool, &["--version"])
}

/// The `/metrics` body of an admin listener.
fn scrape(label: &str, admin: SocketAddr) -> String {
    let r = http_get(admin, "/metrics").unwrap_or_else(|e| panic!("[{label}] GET /metrics: {e}"));
    assert_eq!(r.status, 200, "[{label}] GET /metrics status");
    r.body
}

/// `promtool check metrics` on `text`: `Err` with what promtool printed when it refuses it.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics: {}\n{}", out.status, said))
    }
}

/// A mesh whose metrics have seen traffic: an allowed connection (a handshake each side, a
/// certificate obtained, bytes), closed on both sides, and a refused one on the inbound.
fn mesh_with_traffic(prefix: &str) -> Mesh {
    let mesh = Mesh::start(prefix, None);
    mesh.allow_order();
    let refused = probe(mesh.inventory.inbound(), None, &ServerCheck::any());
    assert!(
        refused.result.is_err(),
        "a client without a certificate was admitted"
    );
    for p in [&mesh.order, &mesh.inventory] {
        let closed = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            (metric(p, "ward_connections_closed_total", &[]) >= 1.0).then_some(())
        });
        assert!(
            closed.is_some(),
            "[{}] the echo's connection is not counted closed within 10 s",
            p.label
        );
    }
    mesh
}

#[test]
fn promtool_accepts_the_metrics_of_the_proxy_and_the_server() {
    if !installed("promtool") {
        return;
    }
    let mesh = mesh_with_traffic("promtool");
    let mut refused = Vec::new();
    for (label, admin) in [
        ("order", mesh.order.admin()),
        ("inventory", mesh.inventory.admin()),
        ("server", mesh.server.admin),
    ] {
        let text = scrape(label, admin);
        if let Err(e) = promtool_check(&text) {
            refused.push(format!("[{label}] {e}\n--- /metrics ---\n{text}"));
        }
    }
    assert!(refused.is_empty(), "{}", refused.join("\n"));
}

/// Every family the proxy and the server promise beyond their own `ward_` set.
#[test]
fn process_and_build_info_metrics_are_served_by_the_proxy_and_the_server() {
    let mesh = Mesh::start("process-metrics", None);
    for (label, admin) in [("order", mesh.order.admin()), ("server", mesh.server.admin)] {
        let text = scrape(label, admin);
        let samples = common::net::parse_prometheus(&text);
        let value = |name: &str| {
            samples
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.value)
                .unwrap_or_else(|| panic!("[{label}] no {name} in /metrics:\n{text}"))
        };
        assert!(value("process_resident_memory_bytes") > 0.0, "[{label}]");
        assert!(value("process_virtual_memory_bytes") > 0.0, "[{label}]");
        assert!(value("process_cpu_seconds_total") >= 0.0, "[{label}]");
        assert!(value("process_open_fds") >= 3.0, "[{label}]");
        assert!(
            value("process_max_fds") >= value("process_open_fds"),
            "[{label}]"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(
            started > now - 600.0 && started <= now + 1.0,
            "[{label}] process_start_time_seconds {started} is not a moment ago ({now})"
        );
        let info: Vec<_> = samples
            .iter()
            .filter(|s| s.name == "ward_build_info")
            .collect();
        assert_eq!(info.len(), 1, "[{label}] one ward_build_info:\n{text}");
        assert_eq!(info[0].value, 1.0, "[{label}]");
        let label_of = |k: &str| {
            info[0]
                .labels
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("[{label}] ward_build_info without {k}"))
        };
        assert_eq!(label_of("version"), env!("CARGO_PKG_VERSION"), "[{label}]");
        let revision = label_of("revision");
        assert!(
            revision == "unknown"
                || (revision.len() >= 7 && revision.chars().all(|c| c.is_ascii_hexdigit())),
            "[{label}] revision {revision:?} is neither a git revision nor \"unknown\""
        );
    }
}

/// A `prometheus` server on 127.0.0.1 with its own config and storage, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Prometheus {
    /// Scrapes `jobs` (name, targets) every second.
    fn start(jobs: &[(&str, Vec<SocketAddr>)]) -> Self {
        let dir = TempDir::new("prometheus");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, targets) in jobs {
            let targets: Vec<String> = targets.iter().map(|a| format!("'{a}'")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, &config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus { child, addr, dir };
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            http_get(addr, "/-/ready")
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| ())
        });
        assert!(
            ready.is_some(),
            "prometheus on {addr} not ready within 30 s\n{}",
            p.log()
        );
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The result vector of an instant query (`None` if the query failed).
    fn query(&self, promql: &str) -> Option<Vec<serde_json::Value>> {
        let r = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        if v["status"] != "success" {
            return None;
        }
        v["data"]["result"].as_array().cloned()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("===== prometheus log =====\n{}", self.log());
        }
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The sample value of one result of an instant query.
fn sample_value(result: &serde_json::Value) -> f64 {
    result["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn prometheus_scrapes_two_sidecars_and_the_server_and_aggregates_the_handshake_p99() {
    if !installed("prometheus") {
        return;
    }
    let mesh = mesh_with_traffic("prometheus");
    let prom = Prometheus::start(&[
        (
            "ward-sidecars",
            vec![mesh.order.admin(), mesh.inventory.admin()],
        ),
        ("ward-server", vec![mesh.server.admin]),
    ]);

    // Every target scraped and up.
    let mut last = None;
    let up = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        let results = prom.query("up")?;
        let all_up = results.len() == 3 && results.iter().all(|r| sample_value(r) == 1.0);
        last = Some(results);
        all_up.then_some(())
    });
    assert!(
        up.is_some(),
        "`up` is not 1 for the three targets within 30 s; last answer: {last:?}\n{}",
        prom.log()
    );

    // Handshakes keep coming (one refused handshake on inventory's inbound per round) until
    // the p99 across the sidecars is a number: rate() needs two scrapes that differ.
    let p99 = "histogram_quantile(0.99, sum by (le) \
               (rate(ward_tls_handshake_duration_seconds_bucket[1m])))";
    let mut last = None;
    let answered = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let _ = probe(mesh.inventory.inbound(), None, &ServerCheck::any());
        let results = prom.query(p99)?;
        let value = results.first().map(sample_value);
        last = Some(results);
        value.filter(|v| v.is_finite() && *v > 0.0)
    });
    assert!(
        answered.is_some(),
        "`{p99}` returned no finite series within 30 s; last answer: {last:?}\n{}",
        prom.log()
    );
}

// ---- the Grafana dashboard -----------------------------------------------------------------

/// `contrib/grafana/ward.json`.
fn dashboard() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/ward.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The PromQL of every panel target, with its panel's title.
fn panel_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            let title = panel["title"].as_str().unwrap_or_default();
            out.push((title.to_string(), expr.to_string()));
        }
    }
    out
}

/// The queries of the dashboard's variables (`label_values(...)`, not PromQL).
fn variable_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    vars.iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = &v["query"];
            q["query"]
                .as_str()
                .or(q.as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// The `ward_*` and `process_*` metric names in a query; label values (quoted) are skipped.
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = query.chars().peekable();
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    while let Some(c) = chars.next() {
        if c == '"' {
            // a quoted string, escapes included
            while let Some(q) = chars.next() {
                match q {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
        } else if is_start(c) {
            let mut word = c.to_string();
            while let Some(&n) = chars.peek() {
                if n.is_ascii_alphanumeric() || n == '_' || n == ':' {
                    word.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            if word.starts_with("ward_") || word.starts_with("process_") {
                names.push(word);
            }
        } else if c.is_ascii_digit() {
            // a number such as 0.99 or 1e3: not the start of a name
            while chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphanumeric() || *n == '.')
            {
                chars.next();
            }
        }
    }
    names
}

/// `name -> type` from the `# TYPE` lines of an exposition.
fn families(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

/// Whether a queried series name is served: a counter or gauge by its own name, a histogram's
/// `_bucket`, `_sum` or `_count`, a summary's `_sum` or `_count`.
fn served(name: &str, families: &std::collections::HashMap<String, String>) -> Result<(), String> {
    if let Some(kind) = families.get(name) {
        return match kind.as_str() {
            "counter" | "gauge" | "untyped" => Ok(()),
            other => Err(format!(
                "{name} is a {other}: query its series (_bucket, _sum, _count)"
            )),
        };
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(kind) = name
            .strip_suffix(suffix)
            .and_then(|base| families.get(base))
        {
            return if kinds.contains(&kind.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "{name}: its family is a {kind}, which has no {suffix}"
                ))
            };
        }
    }
    Err(format!(
        "{name} is in no /metrics of a sidecar or the server"
    ))
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(ward_tls_handshake_duration_seconds_bucket\
             {job=~\"$job\",result=\"ward_not_a_name\\\"\"}[$__rate_interval]))) \
             / process_max_fds - 1e3"
        ),
        [
            "ward_tls_handshake_duration_seconds_bucket",
            "process_max_fds"
        ]
    );
    let families = families(
        "# TYPE ward_a_total counter\n# TYPE ward_h_seconds histogram\n# TYPE ward_g gauge\n",
    );
    assert!(served("ward_a_total", &families).is_ok());
    assert!(served("ward_h_seconds_bucket", &families).is_ok());
    assert!(served("ward_h_seconds_count", &families).is_ok());
    assert!(served("ward_h_seconds", &families).is_err());
    assert!(served("ward_g_count", &families).is_err());
    assert!(served("ward_a", &families).is_err());
}

/// Every metric the dashboard queries is served by a running sidecar or server; where
/// prometheus is installed, every panel's query also evaluates against them.
#[test]
fn the_grafana_dashboard_queries_only_metrics_that_exist() {
    let dashboard = dashboard();
    let panels = panel_queries(&dashboard);
    assert!(
        panels.len() >= 10,
        "only {} panel queries in the dashboard",
        panels.len()
    );
    for (title, expr) in &panels {
        assert!(
            !expr.trim().is_empty(),
            "panel {title:?} has a target without expr"
        );
    }
    let mesh = mesh_with_traffic("dashboard");
    let mut known = std::collections::HashMap::new();
    for (label, admin) in [
        ("order", mesh.order.admin()),
        ("inventory", mesh.inventory.admin()),
        ("server", mesh.server.admin),
    ] {
        known.extend(families(&scrape(label, admin)));
    }
    let queries = panels
        .iter()
        .map(|(title, expr)| (format!("panel {title:?}"), expr.clone()))
        .chain(
            variable_queries(&dashboard)
                .into_iter()
                .map(|q| ("a variable".to_string(), q)),
        );
    let mut missing = Vec::new();
    let mut checked = 0;
    for (place, query) in queries {
        for name in metric_names(&query) {
            checked += 1;
            if let Err(e) = served(&name, &known) {
                missing.push(format!("{place}: {e}"));
            }
        }
    }
    assert!(
        checked >= 10,
        "only {checked} metric names found in the dashboard"
    );
    assert!(missing.is_empty(), "{}", missing.join("\n"));

    if !installed("prometheus") {
        return;
    }
    let prom = Prometheus::start(&[
        (
            "ward-sidecars",
            vec![mesh.order.admin(), mesh.inventory.admin()],
        ),
        ("ward-server", vec![mesh.server.admin]),
    ]);
    let mut refused = Vec::new();
    for (title, expr) in &panels {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        if prom.query(&promql).is_none() {
            refused.push(format!("panel {title:?}: {promql}"));
        }
    }
    assert!(
        refused.is_empty(),
        "prometheus does not evaluate:\n{}",
        refused.join("\n")
    );
}

/// `ward_ca_expiry_timestamp_seconds{ca}`: the root's is the notAfter of the root in the
/// server's CA file; the intermediate's ends after the default intermediate_ttl (8760h) and no
/// later than the root.
#[test]
fn the_server_exports_when_its_root_and_intermediate_end() {
    let dir = TempDir::new("ca-expiry");
    let server = common::cp::DevServer::start("ca-expiry", dir.path(), None);
    let text = scrape("server", server.admin);
    let samples = common::net::parse_prometheus(&text);
    let expiry = |ca: &str| {
        samples
            .iter()
            .find(|s| {
                s.name == "ward_ca_expiry_timestamp_seconds"
                    && s.labels.iter().any(|(k, v)| k == "ca" && v == ca)
            })
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("no ward_ca_expiry_timestamp_seconds{{ca={ca:?}}}:\n{text}"))
    };
    let pem = std::fs::read(&server.ca_file).expect("the server's CA file");
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
        .map(|c: rustls_pki_types::CertificateDer<'static>| c)
        .expect("a root certificate in the CA file");
    let (_, root) = x509_parser::parse_x509_certificate(&der).expect("the root parses");
    let root_not_after = root.validity().not_after.timestamp() as f64;
    assert_eq!(expiry("root"), root_not_after, "{text}");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let intermediate = expiry("intermediate");
    let year = 8760.0 * 3600.0;
    assert!(
        intermediate > now + year - 600.0 && intermediate <= root_not_after,
        "intermediate ends at {intermediate}, now {now}, root {root_not_after}"
    );
}
