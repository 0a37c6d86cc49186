//! The tunnel's check of a stream's request (security rule 9, a multiplexed tunnel
//! between sidecars, docs/security.md): only a `CONNECT` naming this
//! service passes (on a transparent inbound, with at most a port in plain decimal). The URI is
//! built as h2 builds it from the pseudo-headers.
#![no_main]

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use ward_config::Name;
use ward_proxy::mux::authority;
use ward_proxy::mux::server::{check_request, check_transparent_request};

fuzz_target!(
    |input: (&[u8], &[u8], Option<&[u8]>, Option<&[u8]>, &str, &str)| {
        let (method, auth, scheme, path, service, namespace) = input;
        let Ok(method) = Method::from_bytes(method) else {
            return;
        };
        let mut parts = http::uri::Parts::default();
        parts.authority = Authority::try_from(auth).ok();
        parts.scheme = scheme.and_then(|s| Scheme::try_from(s).ok());
        parts.path_and_query = path.and_then(|p| PathAndQuery::try_from(p).ok());
        let Ok(uri) = Uri::from_parts(parts) else {
            return;
        };
        let target = match (Name::new(service), Name::new(namespace)) {
            (Ok(svc), Ok(ns)) => authority(&svc, &ns),
            _ => format!("{service}.{namespace}"),
        };
        if check_request(&method, &uri, &target).is_ok() {
            assert_eq!(method, Method::CONNECT);
            assert_eq!(
                uri.authority().map(Authority::as_str),
                Some(target.as_str())
            );
        }

        match check_transparent_request(&method, &uri, &target) {
            Ok(None) => assert_eq!(check_request(&method, &uri, &target), Ok(())),
            Ok(Some(port)) => {
                assert_eq!(method, Method::CONNECT);
                assert_ne!(port, 0);
                assert_eq!(
                    uri.authority().map(Authority::as_str),
                    Some(format!("{target}:{port}").as_str())
                );
            }
            Err(_) => {}
        }

        // The outbound's own request for valid names always passes.
        if let (Ok(svc), Ok(ns)) = (Name::new(service), Name::new(namespace)) {
            let target = authority(&svc, &ns);
            let ours: Uri = target.parse().expect("an authority from two valid names");
            assert_eq!(check_request(&Method::CONNECT, &ours, &target), Ok(()));
            let with_port: Uri = format!("{target}:8080").parse().expect("an authority");
            assert_eq!(
                check_transparent_request(&Method::CONNECT, &with_port, &target),
                Ok(Some(8080))
            );
        }
    }
);
