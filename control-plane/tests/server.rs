//! The real server, in-process on port 0, called with a real tonic client over TLS.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};
use ward_config::server::ServerConfig;
use ward_config::time::now_unix;
use ward_control_plane::{build, ServerHandle};
use ward_proto::v1::{
    self, admin_client::AdminClient, identity_client::IdentityClient, mesh_client::MeshClient,
};
use ward_test_support::net::{http_request, HttpResponse};

const ORDER: &str = "spiffe://ward.local/ns/default/svc/order";
const INVENTORY: &str = "spiffe://ward.local/ns/default/svc/inventory";
const WEB: &str = "spiffe://ward.local/ns/default/svc/web";

fn config(dir: &Path) -> ServerConfig {
    let mut cfg = ServerConfig::dev(
        dir.to_path_buf(),
        Some("127.0.0.1:0".parse().unwrap()),
        None,
    );
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg
}

async fn start(dir: &Path) -> ServerHandle {
    build(config(dir)).await.expect("server starts")
}

/// A mesh credential: leaf chain PEM and key PEM.
#[derive(Clone)]
struct MeshCert {
    chain_pem: String,
    key_pem: String,
}

async fn channel(h: &ServerHandle, id: Option<&MeshCert>) -> Channel {
    try_channel(h, id, None)
        .await
        .expect("TLS connection to the server")
}

/// A connected channel, from the loopback address `local` when given.
async fn try_channel(
    h: &ServerHandle,
    id: Option<&MeshCert>,
    local: Option<std::net::IpAddr>,
) -> Result<Channel, tonic::transport::Error> {
    let ca = std::fs::read_to_string(&h.ca_file).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(m) = id {
        tls = tls.identity(Identity::from_pem(&m.chain_pem, &m.key_pem));
    }
    Endpoint::from_shared(h.address())
        .unwrap()
        .local_address(local)
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

fn bearer<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn csr_with(sans: Vec<SanType>, f: impl FnOnce(&mut CertificateParams)) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    f(&mut p);
    let der = p.serialize_request(&key).unwrap().der().to_vec();
    (key, der)
}

fn csr(id: &str) -> (KeyPair, Vec<u8>) {
    csr_with(vec![uri(id)], |_| {})
}

fn pem(der: &[u8]) -> String {
    ward_control_plane::ca::cert_pem(der)
}

struct Ctl {
    admin: AdminClient<Channel>,
    token: String,
}

impl Ctl {
    async fn new(h: &ServerHandle) -> Self {
        Self {
            admin: AdminClient::new(channel(h, None).await),
            token: h
                .admin_token()
                .expect("dev mode hands back the admin token")
                .to_owned(),
        }
    }

    async fn join_token(&mut self, service: &str, uses: u32) -> String {
        self.admin
            .create_token(bearer(
                v1::CreateTokenRequest {
                    service: service.into(),
                    namespace: String::new(),
                    ttl_seconds: 0,
                    uses,
                },
                &self.token,
            ))
            .await
            .unwrap()
            .into_inner()
            .token
    }

    async fn allow(&mut self, source: &str, destination: &str) -> u64 {
        self.admin
            .create_intention(bearer(
                v1::CreateIntentionRequest {
                    intention: Some(v1::Intention {
                        source: source.into(),
                        destination: destination.into(),
                        action: v1::Action::Allow as i32,
                        ..Default::default()
                    }),
                    replace: false,
                },
                &self.token,
            ))
            .await
            .unwrap()
            .into_inner()
            .version
    }
}

/// Signs a CSR for `id` with a join token and returns the mesh credential.
async fn enroll(h: &ServerHandle, token: &str, id: &str) -> (MeshCert, v1::SignResponse) {
    let mut c = IdentityClient::new(channel(h, None).await);
    let (key, der) = csr(id);
    let resp = c
        .sign(bearer(v1::SignRequest { csr: der }, token))
        .await
        .expect("sign with a join token")
        .into_inner();
    let chain_pem = resp.cert_chain.iter().map(|c| pem(c)).collect::<String>();
    (
        MeshCert {
            chain_pem,
            key_pem: key.serialize_pem(),
        },
        resp,
    )
}

#[tokio::test]
async fn join_token_signs_once_and_the_leaf_is_a_workload_svid() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let mut ctl = Ctl::new(&h).await;
    let token = ctl.join_token("order", 1).await;
    let (_, resp) = enroll(&h, &token, ORDER).await;
    assert_eq!(resp.spiffe_id, ORDER);
    assert_eq!(resp.cert_chain.len(), 2);
    assert_eq!(resp.roots.len(), 1);
    let (_, leaf) = x509_parser::parse_x509_certificate(&resp.cert_chain[0]).unwrap();
    let (_, inter) = x509_parser::parse_x509_certificate(&resp.cert_chain[1]).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&resp.roots[0]).unwrap();
    leaf.verify_signature(Some(inter.public_key())).unwrap();
    inter.verify_signature(Some(root.public_key())).unwrap();
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(leaf.validity().not_after.timestamp(), resp.not_after);

    // The second use of a single-use token is refused.
    let mut c = IdentityClient::new(channel(&h, None).await);
    let err = c
        .sign(bearer(v1::SignRequest { csr: csr(ORDER).1 }, &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("already been used"),
        "{}",
        err.message()
    );

    // An unknown token.
    let bogus = format!("wardjt_{}", "A".repeat(43));
    let err = c
        .sign(bearer(v1::SignRequest { csr: csr(ORDER).1 }, &bogus))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("not known"), "{}", err.message());
    h.stop().await.unwrap();
}

#[tokio::test]
async fn refused_csrs_consume_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let mut ctl = Ctl::new(&h).await;
    let token = ctl.join_token("order", 1).await;
    let mut c = IdentityClient::new(channel(&h, None).await);

    // A CSR for another service with order's token.
    let err = c
        .sign(bearer(
            v1::SignRequest {
                csr: csr(INVENTORY).1,
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(ORDER) && err.message().contains(INVENTORY));

    let bad: Vec<(&str, Vec<u8>)> = vec![
        (
            "DNS SAN",
            csr_with(
                vec![uri(ORDER), SanType::DnsName("order".try_into().unwrap())],
                |_| {},
            )
            .1,
        ),
        (
            "two URIs",
            csr_with(vec![uri(ORDER), uri(INVENTORY)], |_| {}).1,
        ),
        (
            "CA extension",
            csr_with(vec![uri(ORDER)], |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            })
            .1,
        ),
        ("server identity", csr("spiffe://ward.local/ward/server").1),
        ("garbage", b"nope".to_vec()),
    ];
    for (what, der) in bad {
        let err = c
            .sign(bearer(v1::SignRequest { csr: der }, &token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    // The single use is still there.
    enroll(&h, &token, ORDER).await;
    h.stop().await.unwrap();
}

#[tokio::test]
async fn calls_without_their_credential_are_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let ch = channel(&h, None).await;
    let mut admin = AdminClient::new(ch.clone());
    let wrong = "wardat_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let truncated = h.admin_token().unwrap()[..20].to_owned();
    for token in [None, Some(wrong), Some(truncated.as_str())] {
        let codes = [
            admin
                .list_intentions(with_opt(v1::ListIntentionsRequest::default(), token))
                .await
                .map(|_| ()),
            admin.create_token(req_token(token)).await.map(|_| ()),
            admin.list_roots(req_roots(token)).await.map(|_| ()),
            admin.check_intention(req_check(token)).await.map(|_| ()),
            admin.list_services(req_services(token)).await.map(|_| ()),
        ];
        for c in codes {
            assert_eq!(
                c.unwrap_err().code(),
                Code::Unauthenticated,
                "token {token:?}"
            );
        }
    }
    // The admin token is no credential for Sign or Mesh.
    let mut id = IdentityClient::new(ch.clone());
    let err = id
        .sign(bearer(
            v1::SignRequest { csr: csr(ORDER).1 },
            h.admin_token().unwrap(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = id
        .sign(v1::SignRequest { csr: csr(ORDER).1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut mesh = MeshClient::new(ch);
    let err = mesh
        .watch_intentions(bearer(
            v1::WatchIntentionsRequest {},
            h.admin_token().unwrap(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    h.stop().await.unwrap();
}

fn with_opt<T>(m: T, token: Option<&str>) -> Request<T> {
    match token {
        Some(t) => bearer(m, t),
        None => Request::new(m),
    }
}
fn req_token(t: Option<&str>) -> Request<v1::CreateTokenRequest> {
    with_opt(
        v1::CreateTokenRequest {
            service: "order".into(),
            ..Default::default()
        },
        t,
    )
}
fn req_roots(t: Option<&str>) -> Request<v1::ListRootsRequest> {
    with_opt(v1::ListRootsRequest {}, t)
}
fn req_check(t: Option<&str>) -> Request<v1::CheckIntentionRequest> {
    with_opt(
        v1::CheckIntentionRequest {
            source: "order".into(),
            destination: "inventory".into(),
        },
        t,
    )
}
fn req_services(t: Option<&str>) -> Request<v1::ListServicesRequest> {
    with_opt(v1::ListServicesRequest {}, t)
}

#[tokio::test]
async fn renewal_uses_the_mesh_certificate_for_the_same_identity_only() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let mut ctl = Ctl::new(&h).await;
    let token = ctl.join_token("order", 2).await;
    let (cert, first) = enroll(&h, &token, ORDER).await;
    let mut c = IdentityClient::new(channel(&h, Some(&cert)).await);

    let renewed = c
        .sign(v1::SignRequest { csr: csr(ORDER).1 })
        .await
        .expect("renewal with the mesh certificate")
        .into_inner();
    assert_eq!(renewed.spiffe_id, ORDER);
    assert_ne!(renewed.serial, first.serial);

    let err = c
        .sign(v1::SignRequest {
            csr: csr(INVENTORY).1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // One credential per call: a token on a mesh-authenticated connection is refused, and
    // the token keeps its remaining use.
    let err = c
        .sign(bearer(v1::SignRequest { csr: csr(ORDER).1 }, &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    enroll(&h, &token, ORDER).await;
    h.stop().await.unwrap();
}

#[tokio::test]
async fn renewal_with_a_certificate_that_expired_on_an_open_channel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ca.leaf_ttl = Duration::from_secs(2);
    let h = build(cfg).await.unwrap();
    let mut ctl = Ctl::new(&h).await;
    let token = ctl.join_token("order", 1).await;
    let (cert, first) = enroll(&h, &token, ORDER).await;
    let mut c = IdentityClient::new(channel(&h, Some(&cert)).await);
    c.sign(v1::SignRequest { csr: csr(ORDER).1 })
        .await
        .expect("renewal while the certificate is valid");

    // The channel (one TLS connection, verified while the leaf was valid) stays open past
    // the leaf's notAfter.
    for _ in 0..100 {
        if now_unix() > first.not_after {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(now_unix() > first.not_after, "the leaf has expired");
    let err = c
        .sign(v1::SignRequest { csr: csr(ORDER).1 })
        .await
        .expect_err("an expired certificate renews nothing");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());
    h.stop().await.unwrap();
}

#[tokio::test]
async fn watch_intentions_delivers_a_change_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let mut ctl = Ctl::new(&h).await;
    let token = ctl.join_token("inventory", 1).await;
    let (cert, _) = enroll(&h, &token, INVENTORY).await;
    let ch = channel(&h, Some(&cert)).await;
    let mut mesh = MeshClient::new(ch.clone());
    let mut stream = mesh
        .watch_intentions(v1::WatchIntentionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.intentions.is_empty());
    assert_eq!(first.default_action, v1::Action::Deny as i32);
    assert_eq!(first.destination.unwrap().name, "inventory");

    // A second stream of the same kind from the same instance is refused.
    let err = MeshClient::new(ch.clone())
        .watch_intentions(v1::WatchIntentionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // An intention for another destination is not sent to inventory...
    ctl.allow("order", "payments").await;
    // ...this one is, within 1 s.
    let t0 = std::time::Instant::now();
    let version = ctl.allow("order", "inventory").await;
    let next = tokio::time::timeout(Duration::from_secs(1), stream.message())
        .await
        .expect("a snapshot within 1 s")
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(next.version, version);
    assert!(next.version > first.version);
    assert_eq!(next.intentions.len(), 1);
    assert_eq!(next.intentions[0].source, "order");
    assert_eq!(next.intentions[0].action, v1::Action::Allow as i32);

    // The check API names the rule.
    let chk = ctl
        .admin
        .check_intention(bearer(
            v1::CheckIntentionRequest {
                source: "order".into(),
                destination: "inventory".into(),
            },
            &ctl.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(chk.decision, v1::Action::Allow as i32);
    assert_eq!(chk.rule.unwrap().source, "order");
    let chk = ctl
        .admin
        .check_intention(bearer(
            v1::CheckIntentionRequest {
                source: "rogue".into(),
                destination: "inventory".into(),
            },
            &ctl.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(chk.decision, v1::Action::Deny as i32);
    assert!(chk.rule.is_none());
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_n_uses_yields_at_most_n_certificates_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let mut ctl = Ctl::new(&h).await;
    let token = ctl.join_token("order", 3).await;
    let mut calls = Vec::new();
    for _ in 0..16 {
        let ch = channel(&h, None).await;
        let token = token.clone();
        calls.push(tokio::spawn(async move {
            IdentityClient::new(ch)
                .sign(bearer(v1::SignRequest { csr: csr(ORDER).1 }, &token))
                .await
        }));
    }
    let mut ok = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::Unauthenticated, "{e:?}"),
        }
    }
    assert_eq!(ok, 3, "exactly the token's uses");
    h.stop().await.unwrap();
}

#[tokio::test]
async fn restart_keeps_the_ca_and_the_intentions() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let ca_before = std::fs::read_to_string(&h.ca_file).unwrap();
    let mut ctl = Ctl::new(&h).await;
    let token = ctl.join_token("order", 1).await;
    let (cert, _) = enroll(&h, &token, ORDER).await;
    let version = ctl.allow("order", "inventory").await;
    drop(ctl);
    h.stop().await.unwrap();

    let h = start(dir.path()).await;
    assert_eq!(std::fs::read_to_string(&h.ca_file).unwrap(), ca_before);
    let mut ctl = Ctl::new(&h).await;
    let list = ctl
        .admin
        .list_intentions(bearer(v1::ListIntentionsRequest::default(), &ctl.token))
        .await
        .unwrap()
        .into_inner();
    // The rule is kept as written; the policy's version rose with the restart, so proxies that
    // reconnect take this run's policy (the default is part of it).
    assert!(list.version > version, "{} after {version}", list.version);
    assert_eq!(list.intentions.len(), 1);
    assert_eq!(list.intentions[0].version, version);
    // A certificate from before the restart still authenticates.
    let renewed = IdentityClient::new(channel(&h, Some(&cert)).await)
        .sign(v1::SignRequest { csr: csr(ORDER).1 })
        .await
        .unwrap();
    assert_eq!(renewed.into_inner().spiffe_id, ORDER);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn unreadable_state_is_an_error_and_no_new_ca() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    h.stop().await.unwrap();
    let state = dir.path().join("state.redb");
    std::fs::write(&state, vec![0x5a; 8192]).unwrap();
    let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let err = build(config(dir.path())).await.unwrap_err().to_string();
    assert!(err.contains("state.redb"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    assert_eq!(
        std::fs::read(&state).unwrap(),
        vec![0x5a; 8192],
        "state left untouched"
    );
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);

    // Removed state with ward's files still there: refused too.
    std::fs::remove_file(&state).unwrap();
    let err = build(config(dir.path())).await.unwrap_err().to_string();
    assert!(
        err.contains("ca.pem") && err.contains("state.redb"),
        "{err}"
    );
    assert!(!state.exists());
}

#[tokio::test]
async fn first_start_outside_dev_writes_the_admin_token_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cfg = config(&data);
    cfg.dev = false;
    let h = build(cfg.clone()).await.unwrap();
    assert!(h.admin_token().is_none() && h.export_lines().is_none());
    let path = h.admin_token_file.clone().unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let state_mode = std::fs::metadata(data.join("state.redb"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(state_mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    let mut admin = AdminClient::new(channel(&h, None).await);
    admin
        .list_roots(bearer(v1::ListRootsRequest {}, &token))
        .await
        .expect("the written admin token works");
    h.stop().await.unwrap();
    // A second start writes nothing new and the token keeps working.
    let h = build(cfg).await.unwrap();
    assert!(h.admin_token_file.is_none());
    AdminClient::new(channel(&h, None).await)
        .list_roots(bearer(v1::ListRootsRequest {}, &token))
        .await
        .unwrap();
    h.stop().await.unwrap();
}

#[tokio::test]
async fn register_takes_the_identity_from_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let mut ctl = Ctl::new(&h).await;
    let (inv, _) = enroll(&h, &ctl.join_token("inventory", 1).await, INVENTORY).await;
    let (rogue, _) = enroll(
        &h,
        &ctl.join_token("rogue", 1).await,
        "spiffe://ward.local/ns/default/svc/rogue",
    )
    .await;
    let (order, _) = enroll(&h, &ctl.join_token("order", 1).await, ORDER).await;

    let mut watcher = MeshClient::new(channel(&h, Some(&order)).await);
    let mut eps = watcher
        .watch_endpoints(v1::WatchEndpointsRequest {
            services: vec![v1::ServiceRef {
                name: "inventory".into(),
                namespace: String::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = eps.message().await.unwrap().unwrap();
    assert!(first.services[0].endpoints.is_empty());

    let mut reg = MeshClient::new(channel(&h, Some(&inv)).await)
        .register(v1::RegisterRequest {
            address: "127.0.0.1:21000".into(),
            protocol: v1::Protocol::Tcp as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = reg.message().await.unwrap().unwrap();
    assert_eq!(r.service.unwrap().name, "inventory");
    let next = tokio::time::timeout(Duration::from_secs(1), eps.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.services[0].endpoints[0].address, "127.0.0.1:21000");

    let err = MeshClient::new(channel(&h, Some(&rogue)).await)
        .register(v1::RegisterRequest {
            address: "127.0.0.1:21000".into(),
            protocol: v1::Protocol::Tcp as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    drop(reg);
    h.stop().await.unwrap();
}

/// A transparent sidecar's registration carries its transparent port into every endpoint
/// listing; a value that is not a port is INVALID_ARGUMENT naming the field. A watch with `all`
/// lists the requested services, then every other registered one, and is still the caller's one
/// WatchEndpoints stream (security rule 15, bounds, docs/security.md).
#[tokio::test]
async fn a_transparent_port_is_listed_and_all_watches_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let mut ctl = Ctl::new(&h).await;
    let (inv, _) = enroll(&h, &ctl.join_token("inventory", 1).await, INVENTORY).await;
    let (order, _) = enroll(&h, &ctl.join_token("order", 1).await, ORDER).await;
    let (web, _) = enroll(&h, &ctl.join_token("web", 1).await, WEB).await;

    let transparent = |address: &str, transparent_port| v1::RegisterRequest {
        address: address.into(),
        protocol: v1::Protocol::Tcp as i32,
        transparent_port,
    };
    let err = MeshClient::new(channel(&h, Some(&web)).await)
        .register(transparent("0.0.0.0:15006", 65536))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("transparent_port"),
        "{}",
        err.message()
    );

    // Only a transparent inbound: its address is the registered one, with the caller's IP.
    let mut web_reg = MeshClient::new(channel(&h, Some(&web)).await)
        .register(transparent("0.0.0.0:15006", 15006))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        web_reg.message().await.unwrap().unwrap().address,
        "127.0.0.1:15006"
    );
    let mut inv_reg = register(&h, &inv, "127.0.0.1:21000").await.unwrap();
    inv_reg.message().await.unwrap().unwrap();
    let listed = ctl
        .admin
        .list_endpoints(bearer(
            v1::ListEndpointsRequest {
                service: "web".into(),
            },
            &ctl.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.endpoints[0].transparent_port, 15006);

    let watch = || v1::WatchEndpointsRequest {
        services: vec![v1::ServiceRef {
            name: "payments".into(),
            namespace: String::new(),
        }],
        all: true,
    };
    let mut watcher = MeshClient::new(channel(&h, Some(&order)).await);
    let mut eps = watcher.watch_endpoints(watch()).await.unwrap().into_inner();
    let first = eps.message().await.unwrap().unwrap();
    let listed: Vec<(String, Vec<(String, u32)>)> = first
        .services
        .iter()
        .map(|s| {
            (
                s.service.as_ref().unwrap().name.clone(),
                s.endpoints
                    .iter()
                    .map(|e| (e.address.clone(), e.transparent_port))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("payments".to_owned(), vec![]),
            (
                "inventory".to_owned(),
                vec![("127.0.0.1:21000".to_owned(), 0)]
            ),
            (
                "web".to_owned(),
                vec![("127.0.0.1:15006".to_owned(), 15006)]
            ),
        ]
    );
    let err = watcher.watch_endpoints(watch()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    drop((eps, web_reg, inv_reg));
    h.stop().await.unwrap();
}

#[tokio::test]
async fn admin_http_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    for (path, want) in [
        ("/live", 200),
        ("/ready", 200),
        ("/metrics", 200),
        ("/x", 404),
    ] {
        let out = admin_request(h.admin_addr, "GET", path, &[]).await;
        assert_eq!(out.status, want, "{path}: {}", out.body);
        if path == "/metrics" {
            assert!(out.body.contains("ward_server_sign_total"), "{}", out.body);
            assert!(!out.body.contains(h.admin_token().unwrap()));
        }
    }
    h.stop().await.unwrap();
}

/// One request on a fresh connection to the admin listener, with `headers`: its status line's
/// code and its body (the test-support client, off the runtime's threads).
async fn admin_request(
    addr: std::net::SocketAddr,
    method: &'static str,
    path: &'static str,
    headers: &[(&'static str, String)],
) -> HttpResponse {
    let headers = headers.to_vec();
    tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http_request(addr, method, path, &headers)
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// `GET /config` shows what the server runs with, and never a key or a token.
#[tokio::test]
async fn admin_config_shows_the_running_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let out = admin_request(h.admin_addr, "GET", "/config", &[]).await;
    assert_eq!(out.status, 200, "{}", out.body);
    let body = out.body.as_str();
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(v["listen"], h.grpc_addr.to_string(), "{v}");
    assert_eq!(v["trust_domain"], "ward.local", "{v}");
    assert_eq!(v["storage"]["backend"], "embedded", "{v}");
    assert_eq!(v["intentions"]["default"], "deny", "{v}");
    assert!(v["intentions"]["version"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["limits"]["max_connections"], 100_000, "{v}");
    assert_eq!(v["limits"]["handshake_timeout"], "10s", "{v}");
    let roots = v["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{v}");
    let ca_pem = std::fs::read_to_string(&h.ca_file).unwrap();
    let (_, root) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).unwrap();
    let root = root.parse_x509().unwrap();
    assert_eq!(roots[0]["serial"], hex::encode(root.raw_serial()), "{v}");
    assert!(
        roots[0]["not_after"].as_str().unwrap().ends_with('Z'),
        "{v}"
    );
    assert!(!body.contains(h.admin_token().unwrap()), "{body}");
    assert!(
        !body.contains("PRIVATE KEY") && !body.contains("BEGIN"),
        "{body}"
    );
    h.stop().await.unwrap();
}

/// `POST /drain` starts the same graceful stop as SIGTERM: it is answered, then the server stops.
#[tokio::test]
async fn admin_post_drain_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let stop_requested = h.stop_requested();
    let out = admin_request(h.admin_addr, "POST", "/drain", &[]).await;
    assert_eq!(out.status, 200, "{}", out.body);
    tokio::time::timeout(Duration::from_secs(10), stop_requested)
        .await
        .expect("POST /drain asks for the stop");
    tokio::time::timeout(Duration::from_secs(10), h.wait())
        .await
        .expect("the server stops within 10 s")
        .unwrap();
}

/// Security rule 13 (admin listener, docs/security.md): on a non-loopback `[admin] listen` only the
/// public GETs are served, even to a loopback peer.
#[tokio::test]
async fn admin_config_and_drain_are_refused_on_a_non_loopback_listener() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.admin.listen = "0.0.0.0:0".parse().unwrap();
    let h = build(cfg).await.expect("server starts");
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], h.admin_addr.port()));
    for (method, path, want) in [
        ("GET", "/config", 403),
        ("POST", "/drain", 403),
        ("GET", "/ready", 200),
    ] {
        let out = admin_request(admin, method, path, &[]).await;
        assert_eq!(out.status, want, "{method} {path}: {}", out.body);
    }
    h.stop().await.unwrap();
}

/// Security rule 13 (admin listener, docs/security.md): an admin POST that carries `Origin` (every
/// cross-site browser POST does) is refused with 403; without it the answer is what it always was.
#[tokio::test]
async fn admin_posts_from_a_web_page_are_forbidden() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    for (method, origin, want) in [
        ("POST", Some("http://evil.example"), 403),
        ("POST", Some("null"), 403),
        ("POST", None, 405),
        ("GET", Some("http://evil.example"), 200),
    ] {
        let origin: Vec<_> = origin
            .map(|o| ("origin", o.to_owned()))
            .into_iter()
            .collect();
        let out = admin_request(h.admin_addr, method, "/metrics", &origin).await;
        assert_eq!(
            out.status, want,
            "{method} with origin {origin:?}: {}",
            out.body
        );
    }
    h.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_messages_and_sign_floods_are_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.sign_burst = 2;
    cfg.limits.sign_per_second = 0.0;
    let h = build(cfg).await.unwrap();
    let mut ctl = Ctl::new(&h).await;
    let token = ctl.join_token("order", 10).await;
    let mut c = IdentityClient::new(channel(&h, None).await);
    let err = c
        .sign(bearer(
            v1::SignRequest {
                csr: vec![0; 5 * 1024 * 1024],
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    enroll(&h, &token, ORDER).await;
    enroll(&h, &token, ORDER).await;
    let err = c
        .sign(bearer(v1::SignRequest { csr: csr(ORDER).1 }, &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    h.stop().await.unwrap();
}

#[tokio::test]
async fn the_server_speaks_tls13_only_as_spiffe_ward_server() {
    use rustls::pki_types::ServerName;
    use rustls_pki_types::pem::PemObject;
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path()).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&h.ca_file).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let roots = std::sync::Arc::new(roots);
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let connect = |versions: &'static [&'static rustls::SupportedProtocolVersion]| {
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let addr = h.grpc_addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
        }
    };
    static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    assert!(connect(TLS12).await.is_err(), "TLS 1.2 refused");
    let tls = connect(TLS13).await.expect("TLS 1.3");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, c) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let uris: Vec<String> = c
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec!["spiffe://ward.local/ward/server".to_owned()]);
    let lines = h.export_lines().unwrap();
    assert!(lines.starts_with(&format!(
        "export WARD_ADDR=https://127.0.0.1:{}\n",
        h.grpc_addr.port()
    )));
    assert!(lines.contains(&format!("export WARD_TOKEN={}\n", h.admin_token().unwrap())));
    assert!(lines.contains(&format!("export WARD_CACERT={}\n", h.ca_file.display())));
    drop(tls);
    h.stop().await.unwrap();
}

/// Connects `n` TCP connections to the gRPC listener from 127.0.0.1 that never send a byte.
async fn silent_connections(h: &ServerHandle, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(tokio::net::TcpStream::connect(h.grpc_addr).await.unwrap());
    }
    out
}

/// Whether the server closed `s`, waiting at most `within`.
async fn closed_by_server(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn silent_connections_from_one_ip_do_not_block_another_and_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.connections.max_pending_handshakes = 8;
    cfg.connections.max_pending_handshakes_per_ip = 2;
    cfg.connections.handshake_timeout = Duration::from_secs(3);
    let h = build(cfg).await.unwrap();
    let token = h.admin_token().unwrap().to_owned();

    // As many silent connections from 127.0.0.1 as the global cap allows.
    let opened = std::time::Instant::now();
    let mut silent = silent_connections(&h, 8).await;
    // A real client from another address still gets its call answered.
    let ch = try_channel(&h, None, Some("127.0.0.2".parse().unwrap()))
        .await
        .expect("a client from 127.0.0.2 connects while 127.0.0.1 holds silent connections");
    AdminClient::new(ch)
        .list_roots(bearer(v1::ListRootsRequest {}, &token))
        .await
        .expect("the call from 127.0.0.2 is answered");

    // Those over the per-IP cap were closed at once; the two it admitted are cut off at the
    // handshake deadline (3 s), not left open.
    for s in &mut silent {
        assert!(
            closed_by_server(s, Duration::from_secs(20)).await,
            "a silent connection is closed by the server"
        );
    }
    assert!(
        opened.elapsed() >= Duration::from_secs(2),
        "the admitted ones were held until the deadline"
    );
    h.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_silent_after_its_tls_handshake_is_closed_at_the_handshake_deadline() {
    use rustls::pki_types::ServerName;
    use rustls_pki_types::pem::PemObject;
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.connections.handshake_timeout = Duration::from_secs(2);
    let h = build(cfg).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&h.ca_file).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(h.grpc_addr).await.unwrap();
    let mut silent = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the TLS handshake completes");
    // It sends nothing, not even the HTTP/2 preface: the server closes it at the deadline
    // instead of keeping its connection slot for good.
    let mut buf = [0u8; 256];
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the server closed the silent connection");
    // A real client is served as before.
    let token = h.admin_token().unwrap().to_owned();
    AdminClient::new(channel(&h, None).await)
        .list_roots(bearer(v1::ListRootsRequest {}, &token))
        .await
        .expect("a client that speaks is answered");
    h.stop().await.unwrap();
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.connections.max_connections = 3;
    let h = build(cfg).await.unwrap();
    let token = h.admin_token().unwrap().to_owned();
    let mut held = Vec::new();
    for _ in 0..3 {
        let ch = channel(&h, None).await;
        AdminClient::new(ch.clone())
            .list_roots(bearer(v1::ListRootsRequest {}, &token))
            .await
            .unwrap();
        held.push(ch);
    }
    let refused = try_channel(&h, None, Some("127.0.0.2".parse().unwrap())).await;
    assert!(
        refused.is_err(),
        "a fourth connection is refused while three are open"
    );
    // A slot is free again once a connection ends.
    held.pop();
    let mut again = None;
    for _ in 0..100 {
        if let Ok(ch) = try_channel(&h, None, None).await {
            again = Some(ch);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    AdminClient::new(again.expect("a slot frees up when a connection closes"))
        .list_roots(bearer(v1::ListRootsRequest {}, &token))
        .await
        .unwrap();
    drop(held);
    h.stop().await.unwrap();
}

/// Opens a `Mesh.Register` stream for `cert` at `address`.
async fn register(
    h: &ServerHandle,
    cert: &MeshCert,
    address: &str,
) -> Result<tonic::Streaming<v1::RegisterResponse>, tonic::Status> {
    MeshClient::new(channel(h, Some(cert)).await)
        .register(v1::RegisterRequest {
            address: address.into(),
            protocol: v1::Protocol::Tcp as i32,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn register_takes_the_ip_from_the_connection_and_caps_instances_per_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.catalog.max_instances_per_identity = 2;
    let h = build(cfg).await.unwrap();
    let mut ctl = Ctl::new(&h).await;
    let token = ctl.join_token("inventory", 3).await;
    let mut certs = Vec::new();
    for _ in 0..3 {
        certs.push(enroll(&h, &token, INVENTORY).await.0);
    }

    // An address on another host is stored with the caller's own source IP, and the port
    // from the request.
    let mut first = register(&h, &certs[0], "10.9.9.9:21000").await.unwrap();
    let r = first.message().await.unwrap().unwrap();
    assert_eq!(r.address, "127.0.0.1:21000");
    let listed = ctl
        .admin
        .list_endpoints(bearer(
            v1::ListEndpointsRequest {
                service: "inventory".into(),
            },
            &ctl.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let addrs: Vec<&str> = listed
        .endpoints
        .iter()
        .map(|e| e.address.as_str())
        .collect();
    assert_eq!(addrs, ["127.0.0.1:21000"]);

    // The identity's second instance fits; a third is over the cap.
    let mut second = register(&h, &certs[1], "127.0.0.1:21001").await.unwrap();
    second.message().await.unwrap().unwrap();
    let err = register(&h, &certs[2], "127.0.0.1:21002")
        .await
        .expect_err("a third instance of one identity is over max_instances_per_identity = 2");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("max_instances_per_identity"),
        "{}",
        err.message()
    );
    drop((first, second));
    h.stop().await.unwrap();
}

#[tokio::test]
async fn a_registered_address_is_kept_when_the_config_trusts_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.catalog.trust_registered_address = true;
    let h = build(cfg).await.unwrap();
    let mut ctl = Ctl::new(&h).await;
    let (inv, _) = enroll(&h, &ctl.join_token("inventory", 1).await, INVENTORY).await;
    let mut reg = register(&h, &inv, "10.9.9.9:21000").await.unwrap();
    let r = reg.message().await.unwrap().unwrap();
    assert_eq!(r.address, "10.9.9.9:21000");
    drop(reg);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn an_address_is_free_once_its_holder_has_been_gone_for_deregister_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.catalog.deregister_after = Duration::from_secs(2);
    let h = build(cfg).await.unwrap();
    let mut ctl = Ctl::new(&h).await;
    let (inv, _) = enroll(&h, &ctl.join_token("inventory", 1).await, INVENTORY).await;
    let (rogue, _) = enroll(
        &h,
        &ctl.join_token("rogue", 1).await,
        "spiffe://ward.local/ns/default/svc/rogue",
    )
    .await;
    let mut held = register(&h, &inv, "127.0.0.1:21000").await.unwrap();
    held.message().await.unwrap().unwrap();
    let err = register(&h, &rogue, "127.0.0.1:21000").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // The holder's stream closes; it stays live for deregister_after.
    drop(held);
    let closed = std::time::Instant::now();
    let err = register(&h, &rogue, "127.0.0.1:21000").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // Then the address is free: retried until it is (10 s at most), never before 2 s.
    let deadline = closed + Duration::from_secs(10);
    let mut taken = loop {
        match register(&h, &rogue, "127.0.0.1:21000").await {
            Ok(stream) => break stream,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the address of an instance gone for deregister_after is free: {e:?}"),
        }
    };
    assert!(
        closed.elapsed() >= Duration::from_secs(2),
        "taken {:?} after its holder closed, before deregister_after",
        closed.elapsed()
    );
    let r = taken.message().await.unwrap().unwrap();
    assert_eq!(r.service.unwrap().name, "rogue");
    h.stop().await.unwrap();
}
