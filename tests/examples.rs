//! The deployment examples (examples/) agree with what ward reads and with the image the
//! Dockerfile makes: every example config passes `ward proxy --check`, and the Kubernetes and
//! Compose files mount each file the config names where it names it, probe the admin port the
//! config listens on, and run as the image's user. The YAML is read with python3's PyYAML
//! (`.ci/run` installs python3-yaml); without it those tests say SKIPPED. `.ci/image.sh` runs
//! the same configs inside the built image.

use serde_json::Value;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use ward_config::proxy::{CredentialSource, ProxyConfig};
use ward_test_support as common;

use common::pki::{Pki, TRUST_DOMAIN};
use common::proc::{wait_for_exit, ward_bin, TempDir};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The uid of the image's user: the Dockerfile's one `USER uid:gid` line, with gid = uid.
fn image_uid() -> u64 {
    let dockerfile = read("Dockerfile");
    let users: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .collect();
    assert_eq!(users.len(), 1, "one USER line in the Dockerfile: {users:?}");
    let (uid, gid) = users[0].trim().split_once(':').expect("USER uid:gid");
    assert_eq!(uid, gid, "the image's group is its user's");
    let uid: u64 = uid.parse().expect("a numeric uid");
    assert_ne!(uid, 0, "the image must not run as root");
    uid
}

/// The documents of a YAML file as JSON, or `None` (after a loud skip) without PyYAML.
fn yaml_docs(rel: &str) -> Option<Vec<Value>> {
    if !common::tool_available("python3", &["-c", "import yaml"]) {
        return None;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
        ])
        .arg(repo(rel))
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{rel} is not valid YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("json from python"))
}

fn parse_config(text: &str) -> ProxyConfig {
    ProxyConfig::parse(Path::new("/etc/ward/ward.toml"), text).expect("the example config parses")
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

/// The config with its absolute paths moved under `root` and every listen port 0, so the host
/// can check it beside other tests (in the image it is checked as written).
fn localize(text: &str, root: &Path) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let listen = trimmed
            .split_once("listen = \"")
            .filter(|(key, _)| key.is_empty() || key.ends_with('_'));
        let line = match listen {
            Some((key, rest)) => {
                let (addr, _) = rest.split_once('"').expect("a quoted address");
                let (host, _) = addr.rsplit_once(':').expect("ip:port");
                format!("{key}listen = \"{host}:0\"")
            }
            None => line.replace("= \"/", &format!("= \"{}/", root.display())),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Writes the files `text` names (certificates for its service, or the server CA and a token)
/// under a fresh root and runs `ward proxy --check` on it.
fn check_on_host(what: &str, text: &str, pki: &Pki) {
    let dir = TempDir::new("examples");
    let text = localize(text, dir.path());
    let config = parse_config(&text);
    let write = |path: &Path, content: &str| {
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, content).expect("write");
    };
    match &config.credentials {
        CredentialSource::Files { tls, .. } => {
            let id = pki.leaf(config.service.name.as_str());
            write(&tls.cert_file, &id.chain_pem);
            write(&tls.key_file, &id.key_pem);
            write(&tls.ca_file, &pki.roots_pem());
        }
        CredentialSource::ControlPlane(cp) => {
            write(&cp.ca_file, &pki.roots_pem());
            let token = cp.token_file.as_ref().expect("a token_file");
            write(token, "not-a-real-token\n");
        }
    }
    let path = dir.join("ward.toml");
    std::fs::write(&path, &text).expect("write config");
    // As in the pod: a transparent sidecar runs as the image's user (ward refuses transparent
    // mode as root, `--check` too), which owns its files.
    let mut cmd = Command::new(ward_bin());
    if config.transparent.is_some() && common::proc::runs_as_root() {
        let uid = image_uid().to_string();
        chown_tree(dir.path(), image_uid() as u32);
        cmd = Command::new("setpriv");
        cmd.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .arg(ward_bin());
    }
    let child = cmd
        .args(["proxy", "--check", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ward");
    let exit = wait_for_exit(child, Instant::now(), Duration::from_secs(30));
    assert!(
        exit.status.is_some_and(|s| s.success()) && exit.stdout.trim_end().ends_with(": ok"),
        "{what}: ward proxy --check failed: {}{}",
        exit.stdout,
        exit.stderr
    );
}

/// Gives `dir` and everything below it to `uid` (group `uid`).
fn chown_tree(dir: &Path, uid: u32) {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).expect("chown");
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            chown_tree(&path, uid);
        } else {
            std::os::unix::fs::chown(&path, Some(uid), Some(uid)).expect("chown");
        }
    }
}

#[test]
fn every_example_config_passes_proxy_check() {
    let pki = Pki::new(TRUST_DOMAIN);
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("examples")).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            check_on_host(&path.display().to_string(), &text, &pki);
            checked += 1;
        }
    }
    assert!(checked >= 2, "the explicit-mode examples are there");
    for manifest in MANIFESTS {
        let Some(docs) = yaml_docs(manifest) else {
            return;
        };
        let config_map = kind(&docs, "ConfigMap");
        let text = str_of(
            &config_map["data"]["ward.toml"],
            "the ConfigMap's ward.toml",
        );
        check_on_host(manifest, text, &pki);
    }
}

/// The Kubernetes examples: explicit mode, and transparent mode with its init container.
const MANIFESTS: [&str; 2] = [
    "examples/kubernetes/inventory.yaml",
    "examples/kubernetes/order-transparent.yaml",
];

/// The manifest's sidecar config (its ConfigMap's `ward.toml`), its Pod and the `ward` container.
fn sidecar(docs: &[Value]) -> (ProxyConfig, &Value, &Value) {
    let config_map = kind(docs, "ConfigMap");
    let config = parse_config(str_of(&config_map["data"]["ward.toml"], "ward.toml"));
    let pod = kind(docs, "Pod");
    let ward = pod["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "ward")
        .expect("a container named ward");
    (config, pod, ward)
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in the manifest");
    found[0]
}

/// The volume mount of `container` under which `path` lies (the deepest), and its volume.
fn mount_of<'a>(pod: &'a Value, container: &'a Value, path: &Path) -> (&'a Value, &'a Value) {
    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    let mount = mounts
        .iter()
        .filter(|m| path.starts_with(str_of(&m["mountPath"], "mountPath")))
        .max_by_key(|m| str_of(&m["mountPath"], "mountPath").len())
        .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()));
    let name = &mount["name"];
    let volume = pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| &v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"));
    (mount, volume)
}

/// The path of `path` below the mount at `mount_path` (its key in a ConfigMap or Secret).
fn key_below(path: &Path, mount_path: &str) -> String {
    let rest = path.strip_prefix(mount_path).expect("below the mount");
    let parts: Vec<Component> = rest.components().collect();
    assert_eq!(
        parts.len(),
        1,
        "{} is one key of its volume",
        path.display()
    );
    rest.to_string_lossy().into_owned()
}

#[test]
fn the_kubernetes_sidecar_gets_every_file_its_config_names() {
    for manifest in MANIFESTS {
        sidecar_gets_every_file_its_config_names(manifest);
    }
}

fn sidecar_gets_every_file_its_config_names(rel: &str) {
    let Some(docs) = yaml_docs(rel) else {
        return;
    };
    let manifest = read(rel);
    let config_map = kind(&docs, "ConfigMap");
    let (config, pod, ward) = sidecar(&docs);

    // The config: the file the ConfigMap mounts is the one `--config` names.
    let args: Vec<&str> = ward["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| str_of(a, "an arg"))
        .collect();
    assert_eq!(args[..3], ["proxy", "--config", "/etc/ward/ward.toml"]);
    let (mount, volume) = mount_of(pod, ward, Path::new(args[2]));
    assert_eq!(mount["mountPath"], args[2]);
    assert_eq!(mount["subPath"], "ward.toml");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);

    let CredentialSource::ControlPlane(cp) = &config.credentials else {
        panic!("the Kubernetes example uses [control_plane]");
    };
    // The join token: a key of a Secret, read-only; the commented `kubectl create secret`
    // line makes that key.
    let token = cp.token_file.as_ref().expect("token_file");
    let (mount, volume) = mount_of(pod, ward, token);
    let secret = str_of(&volume["secret"]["secretName"], "secretName");
    let key = key_below(token, str_of(&mount["mountPath"], "mountPath"));
    assert_eq!(mount["readOnly"], true);
    assert!(
        manifest.contains(&format!(
            "create secret generic {secret} --from-file={key}="
        )),
        "the manifest says how to make Secret {secret} with the key {key}"
    );
    // The server's CA: a key of a ConfigMap made from the server's ca.pem.
    let (mount, volume) = mount_of(pod, ward, &cp.ca_file);
    let ca_map = str_of(&volume["configMap"]["name"], "configMap name");
    let key = key_below(&cp.ca_file, str_of(&mount["mountPath"], "mountPath"));
    assert!(
        manifest.contains(&format!("create configmap {ca_map} --from-file={key}=")),
        "the manifest says how to make ConfigMap {ca_map} with the key {key}"
    );
    // state_dir: on a writable emptyDir, so a restarted sidecar needs no new token; below the
    // mount point, since ward creates it as its own (an emptyDir's root is not).
    let state = cp.state_dir.as_ref().expect("state_dir");
    let (mount, volume) = mount_of(pod, ward, state);
    assert!(volume.get("emptyDir").is_some(), "state_dir on an emptyDir");
    assert_ne!(mount["readOnly"], true);
    assert_ne!(state, Path::new(str_of(&mount["mountPath"], "mountPath")));

    // Runs as the image's user, which can read the token: the Secret's files get its group.
    let uid = image_uid();
    let security = &ward["securityContext"];
    assert_eq!(security["runAsUser"], uid);
    assert_eq!(security["runAsGroup"], uid);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(pod["spec"]["securityContext"]["fsGroup"], uid);
    let (_, volume) = mount_of(pod, ward, token);
    let mode = volume["secret"]["defaultMode"]
        .as_u64()
        .expect("defaultMode");
    assert_eq!(mode & 0o040, 0o040, "the group may read the token");
    assert_eq!(mode & 0o007, 0, "no one else may");

    // Readiness on the admin listener's /ready, which must listen beyond loopback for the
    // kubelet to reach it.
    let probe = &ward["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/ready");
    assert_eq!(probe["port"], config.admin.listen.port());
    assert!(!config.admin.listen.ip().is_loopback());
    let ports: Vec<&Value> = ward["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| &p["containerPort"])
        .collect();
    if let Some(inbound) = &config.inbound {
        assert!(ports.contains(&&Value::from(inbound.listen.port())));
    }

    // The drain: endpoints drop the pod during drain_delay, and the kubelet waits for the
    // drain before it kills the sidecar.
    assert_eq!(config.limits.drain_delay, Duration::from_secs(5));
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(Duration::from_secs(grace) > config.limits.drain_delay + config.limits.drain_timeout);
}

#[test]
fn the_compose_example_mounts_its_config_and_certificates() {
    let Some(docs) = yaml_docs("examples/compose/compose.yaml") else {
        return;
    };
    let services = &docs[0]["services"];
    let ward = &services["ward"];
    assert_eq!(ward["user"], format!("{0}:{0}", image_uid()));
    assert_eq!(ward["network_mode"], "service:app");
    let command: Vec<&str> = ward["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|a| str_of(a, "an arg"))
        .collect();
    assert_eq!(command[..2], ["proxy", "--config"]);
    // Each bind mount as (host path from examples/compose, container path).
    let volumes: Vec<(PathBuf, PathBuf)> = ward["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            let parts: Vec<&str> = str_of(v, "a volume").split(':').collect();
            (repo("examples/compose").join(parts[0]), parts[1].into())
        })
        .collect();
    let host_of = |inside: &Path| -> PathBuf {
        let (host, at) = volumes
            .iter()
            .filter(|(_, at)| inside.starts_with(at))
            .max_by_key(|(_, at)| at.as_os_str().len())
            .unwrap_or_else(|| panic!("nothing is mounted at {}", inside.display()));
        match inside.strip_prefix(at).expect("below") {
            rest if rest.as_os_str().is_empty() => host.clone(),
            rest => host.join(rest),
        }
    };
    let config_file = host_of(Path::new(command[2]));
    let text = std::fs::read_to_string(&config_file).expect("the mounted config exists");
    let config = parse_config(&text);
    let CredentialSource::Files { tls, .. } = &config.credentials else {
        panic!("the Compose example uses [tls]");
    };
    // The certificates come from ./tls next to compose.yaml.
    for file in [&tls.cert_file, &tls.key_file, &tls.ca_file] {
        assert_eq!(
            host_of(file).parent(),
            Some(repo("examples/compose").join("./tls").as_path()),
            "{} is mounted from ./tls",
            file.display()
        );
    }
    // The sidecar shares the app's network namespace: the app publishes the inbound port.
    let inbound = config.inbound.as_ref().expect("[inbound]").listen.port();
    let published: Vec<&str> = services["app"]["ports"]
        .as_array()
        .expect("the app's ports")
        .iter()
        .map(|p| str_of(p, "a port"))
        .collect();
    assert!(published.contains(&format!("{inbound}:{inbound}").as_str()));
}

/// CI builds the runtime stage on a base it imports under the name `FROM` uses; the two must
/// not drift apart, and the runtime keeps `ward` as its entrypoint and the redirect tools.
#[test]
fn the_image_script_imports_the_base_the_dockerfile_names() {
    let dockerfile = read("Dockerfile");
    let script = read(".ci/image.sh");
    let base = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM ")?.strip_suffix(" AS runtime-base"))
        .expect("a runtime-base stage");
    assert!(
        script.contains(&format!("base={base} ")),
        "{base} is what .ci/image.sh imports"
    );
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/ward\"]"));
    assert!(dockerfile.contains("install -y --no-install-recommends iptables nftables"));
}

/// The transparent example's init container installs the redirect that the sidecar's config
/// expects: the proxy's own uid exempt (so no loop), the ports its listeners use, the admin port
/// left out (so the kubelet's probes reach it); and `ward redirect` takes those flags.
#[test]
fn the_transparent_example_redirects_to_the_sidecars_ports_and_exempts_its_uid() {
    let rel = "examples/kubernetes/order-transparent.yaml";
    let Some(docs) = yaml_docs(rel) else {
        return;
    };
    let (config, pod, ward) = sidecar(&docs);
    let transparent = config.transparent.as_ref().expect("[transparent]");
    let init = &pod["spec"]["initContainers"][0];
    let args: Vec<&str> = init["args"]
        .as_array()
        .expect("the init container's args")
        .iter()
        .map(|a| str_of(a, "an arg"))
        .collect();
    assert_eq!(args[..2], ["redirect", "install"]);
    let flag = |name: &str| {
        let at = args.iter().position(|a| *a == name);
        at.map(|i| args[i + 1].to_owned())
            .unwrap_or_else(|| panic!("{name} is set"))
    };
    assert_eq!(
        flag("--proxy-uid"),
        ward["securityContext"]["runAsUser"].to_string()
    );
    assert_eq!(flag("--proxy-uid"), image_uid().to_string());
    let port_of = |a: Option<std::net::SocketAddr>| a.expect("a listener").port().to_string();
    assert_eq!(flag("--inbound-port"), port_of(transparent.inbound_listen));
    assert_eq!(
        flag("--outbound-port"),
        port_of(transparent.outbound_listen)
    );
    let excluded = flag("--exclude-inbound-ports");
    assert!(
        excluded
            .split(',')
            .any(|p| p == config.admin.listen.port().to_string()),
        "the admin port is left out of the redirect: {excluded}"
    );
    // The config names the same ports, so no tunnel stream reaches them either.
    assert_eq!(
        ward_config::ports::parse_list(&excluded).expect("the flag's ports"),
        transparent.exclude_inbound_ports
    );
    let caps = &init["securityContext"]["capabilities"]["add"];
    assert!(caps
        .as_array()
        .expect("added capabilities")
        .contains(&Value::from("NET_ADMIN")));
    assert_eq!(ward["securityContext"]["runAsNonRoot"], true);

    // The flags as written are ones `ward redirect` takes (a dry run changes nothing).
    let child = Command::new(ward_bin())
        .args(&args)
        .arg("--dry-run")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ward");
    let exit = wait_for_exit(child, Instant::now(), Duration::from_secs(30));
    assert!(
        exit.status.is_some_and(|s| s.success())
            && exit.stdout.contains("REDIRECT --to-ports 15001"),
        "ward {args:?} --dry-run: {}{}",
        exit.stdout,
        exit.stderr
    );
}
