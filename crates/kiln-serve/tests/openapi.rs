//! The committed `docs/openapi.json` is the spec the handlers generate. After an intended API
//! change, `UPDATE_SNAPSHOTS=1 cargo test -p kiln-serve --test openapi` rewrites it.

use std::path::Path;

#[test]
fn committed_openapi_matches_the_handlers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let generated = kiln_serve::openapi::spec_json();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("docs/openapi.json written");
        return;
    }
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; UPDATE_SNAPSHOTS=1 writes it", path.display()));
    assert!(
        committed == generated,
        "docs/openapi.json is stale: run `UPDATE_SNAPSHOTS=1 cargo test -p kiln-serve --test openapi` and commit the result"
    );
}

#[test]
fn spec_documents_every_route() {
    let spec = serde_json::to_value(kiln_serve::openapi::spec()).expect("serializes");
    let paths: Vec<&str> = spec["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    for route in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
        "/openapi.json",
        "/admin/adapters",
    ] {
        assert!(paths.contains(&route), "{route} missing from {paths:?}");
    }
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let admin = &spec["paths"]["/admin/adapters"];
    for method in ["get", "post"] {
        assert_eq!(
            admin[method]["security"],
            serde_json::json!([{"admin": []}])
        );
    }
    assert_eq!(
        spec["components"]["securitySchemes"]["admin"]["scheme"],
        "bearer"
    );
}
