//! The L7 request path normalization (proxy/src/l7/path.rs), run on every HTTP request before
//! the permissions match it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ward_proxy::l7::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(once) = normalize(target) else {
        return;
    };
    let path = once.path();
    // The path matched and forwarded is absolute, bounded, and a fixed point: normalizing it
    // again changes nothing, so no second reader (a proxy or the app) can resolve it further.
    assert!(path.starts_with('/'), "{target:?} -> {path:?}");
    assert!(path.len() <= target.len(), "{target:?} -> {path:?}");
    assert!(!path.contains("//"), "{target:?} -> {path:?}");
    let twice = normalize(path).unwrap_or_else(|e| panic!("{target:?} -> {path:?}: {e}"));
    assert_eq!(twice.path(), path, "{target:?}");
    assert!(twice.is_unchanged(), "{target:?} -> {path:?}");
    for segment in path.split('/') {
        assert!(segment != "." && segment != "..", "{target:?} -> {path:?}");
    }
    assert_eq!(once.query(), target.split_once('?').map(|(_, q)| q));
});
