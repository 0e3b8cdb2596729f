//! Checks of the deployment files against the code they deploy and against each other: the
//! Dockerfile, deploy/compose.yaml, deploy/gateway.yaml, deploy/prometheus and deploy/k8s.
//!
//! There is no Docker engine or cluster in the test environment, so nothing here builds or
//! applies anything. Instead every piece is parsed by the same code that will read it for real
//! where kiln owns that code (`kiln`'s own argument parser for every command line, the gateway's
//! config loader for deploy/gateway.yaml), and by the Kubernetes API types of k8s-openapi for
//! the manifests. Those types ignore unknown fields, as the API server's lenient decoding does,
//! so each manifest is also serialized back and compared with its input: a misspelt field
//! (`readinessProb:`) is the field that does not come back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod compose;
mod docker;
mod k8s;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser;
use compose::{compose_argv, compose_env, load_compose, service};
use k8s::{Object, config_map_file, k8s_container, kiln_argv, load_k8s};
use kiln_gateway::config::GatewayConfig;

/// The paths both servers answer for probes (`kiln serve` and `kiln gateway`).
const PROBE_PATHS: [&str; 3] = ["/live", "/ready", "/health"];
/// `kiln serve --shutdown-timeout` and `kiln gateway --shutdown-timeout` when not given.
const DEFAULT_SHUTDOWN_TIMEOUT_S: f64 = 30.0;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
}

/// `kiln ARGS…` through kiln's own argument parser.
fn parse_kiln(argv: &[String]) -> Result<(), String> {
    if argv.first().map(String::as_str) != Some("kiln") {
        return Err(format!("{argv:?}: not a kiln command line"));
    }
    crate::Cli::try_parse_from(argv)
        .map(drop)
        .map_err(|e| format!("`{}`: {}", argv.join(" "), e.render()))
}

/// The value of `--flag V` or `--flag=V` in `argv`.
fn flag_value<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            argv.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(flag).and_then(|r| r.strip_prefix('='))
        }
    })
}

/// `--drain-delay` + `--shutdown-timeout` of a kiln command line: the longest a SIGTERM'd
/// server keeps running.
fn drain_budget_s(argv: &[String]) -> Result<f64, String> {
    let seconds = |flag: &str, default: f64| {
        flag_value(argv, flag).map_or(Ok(default), |v| {
            v.parse::<f64>().map_err(|e| format!("{flag} {v}: {e}"))
        })
    };
    Ok(seconds("--drain-delay", 0.0)? + seconds("--shutdown-timeout", DEFAULT_SHUTDOWN_TIMEOUT_S)?)
}

/// The port of `host:port` or of a URL's authority.
fn port_of(authority: &str) -> Option<u16> {
    authority.rsplit_once(':')?.1.parse().ok()
}

/// `(host, port)` of an `http://host:port/…` URL.
fn url_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    Some((host.to_string(), port.parse().ok()?))
}

/// The port a kiln service listens on: `kiln serve --port`, or the gateway's listen address.
fn kiln_listen_port(argv: &[String], gateway: &GatewayConfig) -> Option<u16> {
    match argv.get(1).map(String::as_str) {
        Some("serve") => flag_value(argv, "--port").map_or(Some(8000), |p| p.parse().ok()),
        Some("gateway") => port_of(flag_value(argv, "--listen").unwrap_or(&gateway.listen)),
        _ => None,
    }
}

// ---- deploy/gateway.yaml ------------------------------------------------------------------

/// deploy/gateway.yaml with `${NAME}` from `env`; the names it asked for, found or not.
fn parse_gateway(
    env: &dyn Fn(&str) -> Option<String>,
) -> (Result<GatewayConfig, String>, BTreeSet<String>) {
    let asked = std::sync::Mutex::new(BTreeSet::new());
    let config = GatewayConfig::parse_with_env(
        &read("deploy/gateway.yaml"),
        Path::new("deploy/gateway.yaml"),
        |name| {
            asked.lock().unwrap().insert(name.to_string());
            env(name)
        },
    )
    .map_err(|e| e.to_string());
    (config, asked.into_inner().unwrap())
}

/// Values of the kind a real deployment sets, by variable name.
fn realistic_env(name: &str) -> Option<String> {
    Some(match name {
        n if n.contains("REDIS") => "redis://redis.example.internal:6379".into(),
        n if n.contains("DATABASE") => {
            "postgres://kiln:secret@postgres.example.internal:5432/kiln".into()
        }
        n => format!("value-of-{}", n.to_ascii_lowercase()),
    })
}

#[test]
fn gateway_config_parses_and_points_at_serve() {
    let mut problems = Vec::new();
    let k8s = load_k8s(&mut problems);
    assert_no_problems("deploy/k8s", &problems);

    let (config, asked) = parse_gateway(&realistic_env);
    let config = config.expect("deploy/gateway.yaml");
    assert!(
        !asked.is_empty(),
        "deploy/gateway.yaml should take its secrets from the environment"
    );
    assert!(
        config.store.url.starts_with("postgres://"),
        "store.url: {}",
        config.store.url
    );
    assert!(config.limits.redis_url.is_some() && config.cache.url.is_some());

    // Under the environment the Deployment gives it: literal values and Secret keys, the
    // latter with secret.example.yaml's values.
    let (pod, container) = k8s_container(&k8s, "gateway");
    let example: BTreeMap<String, String> = k8s
        .example_secret
        .as_ref()
        .and_then(|s| s.string_data.clone())
        .unwrap_or_default();
    let k8s_env: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let value = match &e.value_from {
                None => e.value.clone()?,
                Some(from) => example.get(&from.secret_key_ref.as_ref()?.key)?.clone(),
            };
            Some((e.name.clone(), value))
        })
        .collect();
    let (k8s_config, _) = parse_gateway(&|name| k8s_env.get(name).cloned());
    let k8s_config = k8s_config
        .map_err(|e| format!("under the gateway Deployment's env: {e}"))
        .unwrap();

    // One upstream URL for both: the Service (k8s) and the service (compose) `serve`.
    let (host, port) = url_host_port(&k8s_config.upstreams[0].url).unwrap_or_else(|| {
        panic!(
            "upstream {}: expected http://HOST:PORT/v1",
            k8s_config.upstreams[0].url
        )
    });
    assert!(k8s_config.upstreams[0].url.ends_with("/v1"));
    let upstream = k8s.deployed.iter().find_map(|m| match &m.object {
        Object::Service(s) if m.name == host => Some(s),
        _ => None,
    });
    let upstream =
        upstream.unwrap_or_else(|| panic!("upstream host {host}: no Service {host} in deploy/k8s"));
    let service_ports: Vec<i32> = upstream
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| p.port)
        .collect();
    assert!(
        service_ports.contains(&i32::from(port)),
        "upstream port {port}: Service {host} has {service_ports:?}"
    );

    let listen_port = port_of(&k8s_config.listen).expect("listen HOST:PORT");
    let argv = kiln_argv(container);
    assert_eq!(
        kiln_listen_port(&argv, &k8s_config),
        Some(listen_port),
        "the gateway Deployment's args against listen"
    );
    assert!(
        container
            .ports
            .iter()
            .flatten()
            .any(|p| p.container_port == i32::from(listen_port)),
        "the gateway listens on {listen_port}, which is no containerPort"
    );

    // The ConfigMap holds this very file.
    let config_path = flag_value(&argv, "--config").expect("--config");
    let (name, key) =
        config_map_file(pod, container, config_path).expect("--config from a ConfigMap");
    let copy = k8s
        .config_map(name)
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(&key));
    assert!(
        copy.map(String::as_str) == Some(read("deploy/gateway.yaml").as_str()),
        "ConfigMap {name} key {key} (deploy/k8s) is not a copy of deploy/gateway.yaml: copy it again (the commands are in deploy/k8s/gateway-config.yaml)"
    );

    // Under compose's environment, with the same upstream a compose service answers.
    let mut problems = Vec::new();
    let compose = load_compose(&mut problems);
    assert_no_problems("deploy/compose.yaml", &problems);
    let compose_env = compose_env(service(&compose, "gateway"));
    let (compose_config, _) = parse_gateway(&|name| compose_env.get(name).cloned());
    let compose_config = compose_config
        .map_err(|e| format!("under compose's gateway environment: {e}"))
        .unwrap();
    assert_eq!(compose_config.upstreams[0].url, k8s_config.upstreams[0].url);
    let serve_port = kiln_listen_port(&compose_argv(&compose, &host), &compose_config);
    assert_eq!(
        serve_port,
        Some(port),
        "compose service {host} listens on {serve_port:?}, the upstream is port {port}"
    );

    // Both serve their model under a name with a price.
    let (_, serve) = k8s_container(&k8s, "serve");
    for (where_, argv) in [
        ("deploy/k8s serve", kiln_argv(serve)),
        ("deploy/compose.yaml serve", compose_argv(&compose, "serve")),
    ] {
        let name = flag_value(&argv, "--served-model-name").unwrap_or("");
        assert!(
            k8s_config.pricing.contains_key(name),
            "{where_}: --served-model-name {name:?} has no `pricing` entry in deploy/gateway.yaml"
        );
    }
}
