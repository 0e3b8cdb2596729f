//! deploy/compose.yaml and the Prometheus config it mounts.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::k8s::is_kiln_image;
use super::{
    PROBE_PATHS, assert_no_problems, drain_budget_s, flag_value, kiln_listen_port, parse_gateway,
    parse_kiln, port_of, read, realistic_env, repo_root, url_host_port,
};

/// The keys of a service in the Compose Specification (compose-spec's JSON schema): compose
/// refuses any other, and so does this check, so that a typo fails here and not at `up`.
const SERVICE_KEYS: &str = "annotations attach blkio_config build cap_add cap_drop cgroup \
    cgroup_parent command configs container_name cpu_count cpu_percent cpu_period cpu_quota \
    cpu_rt_period cpu_rt_runtime cpu_shares cpus cpuset credential_spec depends_on deploy \
    develop device_cgroup_rules devices dns dns_opt dns_search domainname entrypoint env_file \
    environment expose extends external_links extra_hosts gpus group_add healthcheck hostname \
    image init ipc isolation label_file labels links logging mac_address mem_limit \
    mem_reservation mem_swappiness memswap_limit models network_mode networks oom_kill_disable \
    oom_score_adj pid pids_limit platform ports post_start pre_start pre_stop privileged \
    profiles provider pull_policy pull_refresh_after read_only restart runtime scale secrets \
    security_opt shm_size stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs tty \
    ulimits umask use_api_socket user userns_mode uts volumes volumes_from working_dir";
const HEALTHCHECK_KEYS: [&str; 7] = [
    "disable",
    "interval",
    "retries",
    "start_interval",
    "start_period",
    "test",
    "timeout",
];
const TOP_LEVEL_KEYS: [&str; 10] = [
    "configs", "include", "jobs", "models", "name", "networks", "secrets", "services", "version",
    "volumes",
];

/// Compose's interpolation with every variable unset: `${VAR:-default}` and `${VAR-default}`
/// give the default, `${VAR:?message}`, `${VAR?message}`, `${VAR}` and `$VAR` a placeholder,
/// `$$` is `$`.
fn compose_interpolate(s: &str) -> Result<String, String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let placeholder = |name: &str| format!("placeholder-{}", name.to_ascii_lowercase());
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| format!("{s:?}: unclosed ${{"))?;
            let expr = &r[..end];
            let (name, op) = expr.split_at(expr.find(|c| !is_name(c)).unwrap_or(expr.len()));
            if name.is_empty() {
                return Err(format!("{s:?}: ${{{expr}}} names no variable"));
            }
            if let Some(default) = op.strip_prefix(":-").or_else(|| op.strip_prefix('-')) {
                out.push_str(default);
            } else if op.is_empty() || op.starts_with(":?") || op.starts_with('?') {
                out.push_str(&placeholder(name));
            } else {
                return Err(format!("{s:?}: ${{{expr}}}: unsupported"));
            }
            rest = &r[end + 1..];
        } else {
            let n = after.find(|c| !is_name(c)).unwrap_or(after.len());
            if n == 0 {
                out.push('$');
            } else {
                out.push_str(&placeholder(&after[..n]));
            }
            rest = &after[n..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Every string of `value`, interpolated.
fn interpolate_all(value: &mut Value, problems: &mut Vec<String>) {
    match value {
        Value::String(s) => match compose_interpolate(s) {
            Ok(replaced) => *s = replaced,
            Err(e) => problems.push(format!("deploy/compose.yaml: {e}")),
        },
        Value::Array(items) => items.iter_mut().for_each(|v| interpolate_all(v, problems)),
        Value::Object(map) => map.values_mut().for_each(|v| interpolate_all(v, problems)),
        _ => {}
    }
}

pub(super) fn load_compose(problems: &mut Vec<String>) -> Value {
    let text = read("deploy/compose.yaml");
    let mut yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).expect("deploy/compose.yaml: YAML");
    yaml.apply_merge().expect("deploy/compose.yaml: merge keys");
    let mut compose = serde_json::to_value(yaml).expect("deploy/compose.yaml: string keys");
    interpolate_all(&mut compose, problems);
    compose
}

pub(super) fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    }
}

pub(super) fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose
        .pointer(&format!("/services/{name}"))
        .unwrap_or_else(|| panic!("deploy/compose.yaml: no service {name}"))
}

/// `kiln` + the service's command.
pub(super) fn compose_argv(compose: &Value, name: &str) -> Vec<String> {
    let mut argv = vec!["kiln".to_string()];
    argv.extend(strings(service(compose, name).get("command")));
    argv
}

/// The service's environment, as a map (compose takes a map or `KEY=VALUE` items).
pub(super) fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), String::from),
                )
            })
            .collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `(source, target)` of each bind mount of a service.
fn bind_mounts(service: &Value) -> Vec<(String, String)> {
    let mut mounts = Vec::new();
    for volume in service
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (source, target) = match volume {
            Value::String(s) => {
                let mut parts = s.split(':');
                let source = parts.next().unwrap_or("");
                (source.to_string(), parts.next().unwrap_or("").to_string())
            }
            Value::Object(_) => (
                volume
                    .get("source")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                volume
                    .get("target")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            ),
            _ => continue,
        };
        if source.starts_with('.') || source.starts_with('/') || source.starts_with('~') {
            mounts.push((source, target));
        }
    }
    mounts
}

/// Seconds of a compose duration (`40s`, `1m30s`, `10m`).
fn compose_duration_s(text: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let n: f64 = number.parse().ok()?;
        number.clear();
        total += n * match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
    }
    number.is_empty().then_some(total)
}

/// The port a kiln service listens on: `kiln serve --port`, or the gateway's listen address.

#[test]
fn compose_file_is_consistent() {
    let mut problems = Vec::new();
    let compose = load_compose(&mut problems);
    let services = compose
        .get("services")
        .and_then(Value::as_object)
        .expect("services");
    for name in ["gateway", "serve", "redis", "postgres", "prometheus"] {
        if !services.contains_key(name) {
            problems.push(format!("no service {name}"));
        }
    }
    let deploy = repo_root().join("deploy");
    let (gateway_config, _) = parse_gateway(&realistic_env);
    let gateway_config = gateway_config.expect("deploy/gateway.yaml");
    let named_volumes = compose
        .get("volumes")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();

    let top: Vec<&String> = compose
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys())
        .collect();
    for key in top {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            problems.push(format!(
                "top-level key {key}: not in the Compose Specification"
            ));
        }
    }
    let service_keys: BTreeSet<&str> = SERVICE_KEYS.split_whitespace().collect();
    for (name, svc) in services {
        for key in svc.as_object().into_iter().flat_map(|m| m.keys()) {
            if !service_keys.contains(key.as_str()) {
                problems.push(format!(
                    "{name}: {key} is not a service key of the Compose Specification"
                ));
            }
        }
        for key in svc
            .get("healthcheck")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|m| m.keys())
        {
            if !HEALTHCHECK_KEYS.contains(&key.as_str()) {
                problems.push(format!(
                    "{name}: healthcheck.{key} is not a healthcheck key"
                ));
            }
        }
        for (source, target) in bind_mounts(svc) {
            if source.starts_with('.') && !deploy.join(&source).exists() {
                problems.push(format!(
                    "{name}: bind mount {source} → {target}: no such path under deploy/"
                ));
            }
        }
        for volume in svc
            .get("volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let source = volume
                .as_str()
                .and_then(|v| v.split(':').next())
                .unwrap_or("");
            let is_named = !source.is_empty()
                && !source.contains('/')
                && !source.starts_with('.')
                && volume.as_str().is_some_and(|v| v.contains(':'));
            if is_named && !named_volumes.contains_key(source) {
                problems.push(format!(
                    "{name}: volume {source} is not declared under `volumes`"
                ));
            }
        }
        for dependency in svc
            .get("depends_on")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let (on, how) = dependency;
            let healthy = how.get("condition").and_then(Value::as_str) == Some("service_healthy");
            if healthy
                && services
                    .get(on)
                    .and_then(|s| s.get("healthcheck"))
                    .is_none()
            {
                problems.push(format!(
                    "{name}: waits for {on} to be healthy, which has no healthcheck"
                ));
            }
        }
        let is_kiln = svc.pointer("/build/dockerfile").and_then(Value::as_str)
            == Some("Dockerfile")
            || svc
                .get("image")
                .and_then(Value::as_str)
                .is_some_and(|i| is_kiln_image(Some(i)));
        if !is_kiln {
            continue;
        }
        let argv = compose_argv(&compose, name);
        if let Err(e) = parse_kiln(&argv) {
            problems.push(format!("{name}: {e}"));
        }
        if svc.get("init") != Some(&Value::Bool(true)) {
            problems.push(format!(
                "{name}: `init: true` (kiln runs as PID 1 otherwise)"
            ));
        }
        let grace = svc
            .get("stop_grace_period")
            .and_then(Value::as_str)
            .and_then(compose_duration_s)
            .unwrap_or(10.0);
        match drain_budget_s(&argv) {
            Ok(budget) if grace > budget => {}
            Ok(budget) => problems.push(format!("{name}: stop_grace_period {grace}s must exceed --drain-delay + --shutdown-timeout ({budget}s)")),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
        let listen = kiln_listen_port(&argv, &gateway_config);
        let test = strings(svc.pointer("/healthcheck/test"));
        match test.split_first() {
            Some((form, command)) if form == "CMD" => {
                if let Err(e) = parse_kiln(command) {
                    problems.push(format!("{name}: healthcheck: {e}"));
                }
                let url = flag_value(command, "--url").unwrap_or("http://127.0.0.1:8080/live");
                let path = url.find("://").and_then(|i| url[i + 3..].find('/').map(|j| &url[i + 3 + j..])).unwrap_or("/");
                if !PROBE_PATHS.contains(&path) {
                    problems.push(format!("{name}: healthcheck path {path} is none of {PROBE_PATHS:?}"));
                }
                if url_host_port(url).map(|(_, p)| p) != listen {
                    problems.push(format!("{name}: healthcheck {url}, the service listens on {listen:?}"));
                }
            }
            _ => problems.push(format!("{name}: healthcheck.test should be [CMD, kiln, healthcheck, …] (the image has no shell tools)")),
        }
    }

    // The gateway's config file is deploy/gateway.yaml, and it publishes its listen port.
    let gateway = service(&compose, "gateway");
    let argv = compose_argv(&compose, "gateway");
    let config_path = flag_value(&argv, "--config").unwrap_or("");
    let mounted = bind_mounts(gateway)
        .into_iter()
        .any(|(s, t)| t == config_path && deploy.join(&s) == deploy.join("gateway.yaml"));
    if !mounted {
        problems.push(format!(
            "gateway: --config {config_path} is not ./gateway.yaml mounted"
        ));
    }
    let listen = kiln_listen_port(&argv, &gateway_config);
    let published = strings(gateway.get("ports"))
        .iter()
        .any(|p| port_of(p.trim_end_matches("/tcp")) == listen);
    if !published {
        problems.push(format!("gateway: its port {listen:?} is not published"));
    }
    for (dependency, condition) in [
        ("serve", "service_healthy"),
        ("redis", "service_healthy"),
        ("postgres", "service_healthy"),
    ] {
        if gateway
            .pointer(&format!("/depends_on/{dependency}/condition"))
            .and_then(Value::as_str)
            != Some(condition)
        {
            problems.push(format!(
                "gateway: depends_on {dependency} should wait for {condition}"
            ));
        }
    }

    // Prometheus: its config and the alert rules side by side, scraping both kiln services.
    let prometheus_yml = read("deploy/prometheus/prometheus.yml");
    let prometheus: Value = serde_yaml_ng::from_str(&prometheus_yml).expect("prometheus.yml");
    let mounts = bind_mounts(service(&compose, "prometheus"));
    let target_of = |file: &str| {
        mounts
            .iter()
            .find(|(s, _)| deploy.join(s) == deploy.join(file))
            .map(|(_, t)| t.clone())
    };
    let config_target = target_of("prometheus/prometheus.yml");
    if config_target.as_deref() != Some("/etc/prometheus/prometheus.yml") {
        problems.push(format!(
            "prometheus: prometheus.yml is mounted at {config_target:?}"
        ));
    }
    let rules = strings(prometheus.get("rule_files"));
    if !rules.iter().any(|r| r == "kiln-alerts.yaml") {
        problems.push(format!(
            "prometheus.yml: rule_files {rules:?} lacks kiln-alerts.yaml"
        ));
    }
    for rule in &rules {
        let in_container = format!("/etc/prometheus/{rule}");
        if !mounts
            .iter()
            .any(|(s, t)| *t == in_container && deploy.join(s).is_file())
        {
            problems.push(format!(
                "prometheus: rule file {rule} is not mounted at {in_container}"
            ));
        }
    }
    let alerts: Value = serde_yaml_ng::from_str(&read("deploy/prometheus/kiln-alerts.yaml"))
        .expect("kiln-alerts.yaml");
    assert!(
        alerts
            .get("groups")
            .and_then(Value::as_array)
            .is_some_and(|g| !g.is_empty())
    );
    let targets: Vec<String> = prometheus
        .get("scrape_configs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|job| {
            job.get("static_configs")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|sc| strings(sc.get("targets")))
        .collect();
    let mut scraped = BTreeSet::new();
    for target in &targets {
        let (host, port) = target.rsplit_once(':').unwrap_or((target, ""));
        if !services.contains_key(host) {
            problems.push(format!(
                "prometheus.yml: target {target}: no compose service {host}"
            ));
            continue;
        }
        let listen = kiln_listen_port(&compose_argv(&compose, host), &gateway_config);
        if listen.map(|p| p.to_string()).as_deref() != Some(port) {
            problems.push(format!(
                "prometheus.yml: target {target}: {host} listens on {listen:?}"
            ));
        }
        scraped.insert(host.to_string());
    }
    for kiln in ["gateway", "serve"] {
        if !scraped.contains(kiln) {
            problems.push(format!("prometheus.yml: {kiln} is not scraped"));
        }
    }
    assert_no_problems("deploy/compose.yaml", &problems);
}

#[test]
fn compose_interpolation_follows_compose() {
    assert_eq!(
        compose_interpolate("${A:-../x}:/m:ro").unwrap(),
        "../x:/m:ro"
    );
    assert_eq!(
        compose_interpolate("${A-1}${B:?set B} $$HOME").unwrap(),
        "1placeholder-b $HOME"
    );
    assert_eq!(
        compose_interpolate("$NAME/x").unwrap(),
        "placeholder-name/x"
    );
    assert!(compose_interpolate("${A").is_err());
    assert_eq!(compose_duration_s("1m30s"), Some(90.0));
    assert_eq!(compose_duration_s("40"), None);
}
