//! deploy/k8s: every manifest through the Kubernetes API types and back, then the references
//! between them.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, PodSpec, Secret, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::compose::strings;
use super::{
    PROBE_PATHS, assert_no_problems, drain_budget_s, flag_value, parse_kiln, read, repo_root,
};

/// The Secret the manifests read but never contain; secret.example.yaml documents its keys.
const EXTERNAL_SECRET: &str = "kiln-secrets";
const SECRET_EXAMPLE: &str = "secret.example.yaml";
const KUSTOMIZATION: &str = "kustomization.yaml";
/// Kubernetes' `terminationGracePeriodSeconds` when not given.
const DEFAULT_GRACE_S: f64 = 30.0;

/// The first key path of `input` that `output` lacks or holds with another value.
fn first_difference(input: &Value, output: &Value, path: &str) -> Option<String> {
    match (input, output) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(key, v)| {
            let p = format!("{path}.{key}");
            match b.get(key) {
                None => Some(format!(
                    "{p}: not a field of this kind (the API types drop it: a typo?)"
                )),
                Some(w) => first_difference(v, w, &p),
            }
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, &format!("{path}[{i}]"))),
        _ if input == output => None,
        _ => Some(format!("{path}: {input} came back as {output}")),
    }
}

#[derive(Debug)]
pub(super) enum Object {
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    Hpa(Box<HorizontalPodAutoscaler>),
    Pdb(Box<PodDisruptionBudget>),
    ConfigMap(Box<ConfigMap>),
    Secret(Box<Secret>),
    Pvc(Box<PersistentVolumeClaim>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Deployment(_) => "Deployment",
            Object::Service(_) => "Service",
            Object::Hpa(_) => "HorizontalPodAutoscaler",
            Object::Pdb(_) => "PodDisruptionBudget",
            Object::ConfigMap(_) => "ConfigMap",
            Object::Secret(_) => "Secret",
            Object::Pvc(_) => "PersistentVolumeClaim",
        }
    }
}

/// `value` as a `T`, provided that every field of `value` survives the trip to `T` and back.
fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Box<T>, String> {
    let object: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&object).map_err(|e| e.to_string())?;
    match first_difference(value, &back, "$") {
        Some(difference) => Err(difference),
        None => Ok(Box::new(object)),
    }
}

fn to_object(value: &Value) -> Result<Object, String> {
    let field = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or("");
    Ok(match (field("apiVersion"), field("kind")) {
        ("apps/v1", "Deployment") => Object::Deployment(round_trip(value)?),
        ("v1", "Service") => Object::Service(round_trip(value)?),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => Object::Hpa(round_trip(value)?),
        ("policy/v1", "PodDisruptionBudget") => Object::Pdb(round_trip(value)?),
        ("v1", "ConfigMap") => Object::ConfigMap(round_trip(value)?),
        ("v1", "Secret") => Object::Secret(round_trip(value)?),
        ("v1", "PersistentVolumeClaim") => Object::Pvc(round_trip(value)?),
        (api_version, kind) => {
            return Err(format!(
                "apiVersion {api_version:?} kind {kind:?}: not a kind these checks know"
            ));
        }
    })
}

#[derive(Debug)]
pub(super) struct Manifest {
    /// `file document N`, for messages.
    pub(super) at: String,
    pub(super) name: String,
    pub(super) object: Object,
}

/// Every document of the multi-document YAML `text`, each as its API type.
fn parse_manifests(file: &str, text: &str, problems: &mut Vec<String>) -> Vec<Manifest> {
    let mut manifests = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let at = format!("{file} document {index}");
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                problems.push(format!("{at}: {e}"));
                continue;
            }
        };
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match to_object(&value) {
            Ok(object) => manifests.push(Manifest { at, name, object }),
            Err(e) => problems.push(format!("{at}: {e}")),
        }
    }
    manifests
}

/// The manifests of deploy/k8s: those kustomization.yaml applies, and the examples.
pub(super) struct K8s {
    pub(super) deployed: Vec<Manifest>,
    pub(super) example_secret: Option<Box<Secret>>,
}

fn k8s_yaml_files() -> Vec<String> {
    let dir = repo_root().join("deploy/k8s");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect();
    files.sort();
    files
}

pub(super) fn load_k8s(problems: &mut Vec<String>) -> K8s {
    let mut deployed = Vec::new();
    let mut example_secret = None;
    for file in k8s_yaml_files() {
        if file == KUSTOMIZATION {
            continue;
        }
        let manifests = parse_manifests(&file, &read(&format!("deploy/k8s/{file}")), problems);
        if file == SECRET_EXAMPLE {
            for m in manifests {
                match m.object {
                    Object::Secret(s) if m.name == EXTERNAL_SECRET => example_secret = Some(s),
                    _ => problems.push(format!(
                        "{}: expected only the Secret {EXTERNAL_SECRET}",
                        m.at
                    )),
                }
            }
        } else {
            deployed.extend(manifests);
        }
    }
    K8s {
        deployed,
        example_secret,
    }
}

impl K8s {
    fn deployments(&self) -> impl Iterator<Item = (&Manifest, &Deployment)> {
        self.deployed.iter().filter_map(|m| match &m.object {
            Object::Deployment(d) => Some((m, d.as_ref())),
            _ => None,
        })
    }

    fn deployment(&self, name: &str) -> Option<&Deployment> {
        self.deployments()
            .find(|(m, _)| m.name == name)
            .map(|(_, d)| d)
    }

    pub(super) fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.deployed.iter().find_map(|m| match &m.object {
            Object::ConfigMap(c) if m.name == name => Some(c.as_ref()),
            _ => None,
        })
    }

    /// A Secret of the manifests, or the external one as secret.example.yaml documents it.
    fn secret_keys(&self, name: &str) -> Option<BTreeSet<String>> {
        let keys = |s: &Secret| {
            let string_data = s.string_data.iter().flat_map(|d| d.keys().cloned());
            let data = s.data.iter().flat_map(|d| d.keys().cloned());
            string_data.chain(data).collect()
        };
        let deployed = self.deployed.iter().find_map(|m| match &m.object {
            Object::Secret(s) if m.name == name => Some(keys(s)),
            _ => None,
        });
        deployed.or_else(|| {
            (name == EXTERNAL_SECRET)
                .then(|| self.example_secret.as_deref().map(keys))
                .flatten()
        })
    }

    fn pvc(&self, name: &str) -> Option<&PersistentVolumeClaim> {
        self.deployed.iter().find_map(|m| match &m.object {
            Object::Pvc(p) if m.name == name => Some(p.as_ref()),
            _ => None,
        })
    }

    fn has_pvc(&self, name: &str) -> bool {
        self.pvc(name).is_some()
    }
}

fn pod_spec(d: &Deployment) -> Option<&PodSpec> {
    d.spec.template.spec.as_ref()
}

fn pod_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// A non-empty selector whose every label the pod carries.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn port_matches(container: &Container, port: &IntOrString) -> bool {
    container.ports.iter().flatten().any(|p| match port {
        IntOrString::Int(n) => p.container_port == *n,
        IntOrString::String(name) => p.name.as_deref() == Some(name.as_str()),
    })
}

pub(super) fn is_kiln_image(image: Option<&str>) -> bool {
    let image = image.unwrap_or("");
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split([':', '@']).next() == Some("kiln")
}

/// `command` + `args` of a kiln container; the image's entrypoint is `kiln`.
pub(super) fn kiln_argv(c: &Container) -> Vec<String> {
    let mut argv = c.command.clone().unwrap_or_else(|| vec!["kiln".into()]);
    argv.extend(c.args.iter().flatten().cloned());
    argv
}

/// The ConfigMap and key that provide the file `path` in container `c` of `pod`.
pub(super) fn config_map_file<'a>(
    pod: &'a PodSpec,
    c: &Container,
    path: &str,
) -> Option<(&'a str, String)> {
    c.volume_mounts.iter().flatten().find_map(|mount| {
        let rel = path.strip_prefix(&format!("{}/", mount.mount_path.trim_end_matches('/')))?;
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)?;
        let source = volume.config_map.as_ref()?;
        let key = match &source.items {
            Some(items) => items.iter().find(|i| i.path == rel)?.key.clone(),
            None => rel.to_string(),
        };
        Some((source.name.as_str(), key))
    })
}

/// The PersistentVolumeClaim mounted read-only over `path` in container `c`.
fn read_only_claim<'a>(pod: &'a PodSpec, c: &Container, path: &str) -> Option<&'a str> {
    c.volume_mounts.iter().flatten().find_map(|mount| {
        let inside = path == mount.mount_path
            || path.starts_with(&format!("{}/", mount.mount_path.trim_end_matches('/')));
        if !inside || mount.read_only != Some(true) {
            return None;
        }
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)?;
        Some(volume.persistent_volume_claim.as_ref()?.claim_name.as_str())
    })
}

/// One kiln container: its command line, probes, references, security and resources.
fn check_container(k8s: &K8s, at: &str, pod: &PodSpec, c: &Container, problems: &mut Vec<String>) {
    let at = format!("{at} container {}", c.name);
    if !is_kiln_image(c.image.as_deref()) {
        problems.push(format!("{at}: image {:?} is not kiln", c.image));
        return;
    }
    let argv = kiln_argv(c);
    if let Err(e) = parse_kiln(&argv) {
        problems.push(format!("{at}: {e}"));
    }
    match drain_budget_s(&argv) {
        Ok(budget) => {
            let grace = pod
                .termination_grace_period_seconds
                .map_or(DEFAULT_GRACE_S, |s| s as f64);
            if grace <= budget {
                problems.push(format!(
                    "{at}: terminationGracePeriodSeconds {grace} must exceed --drain-delay + --shutdown-timeout ({budget})"
                ));
            }
        }
        Err(e) => problems.push(format!("{at}: {e}")),
    }
    match argv.get(1).map(String::as_str) {
        Some("serve") => {
            let model = flag_value(&argv, "--model").unwrap_or("");
            match read_only_claim(pod, c, model) {
                Some(claim) if k8s.has_pvc(claim) => {}
                Some(claim) => problems.push(format!(
                    "{at}: PersistentVolumeClaim {claim} is not in the manifests"
                )),
                None => problems.push(format!(
                    "{at}: --model {model} is not on a read-only PersistentVolumeClaim mount"
                )),
            }
        }
        Some("gateway") => {
            let config = flag_value(&argv, "--config").unwrap_or("");
            match config_map_file(pod, c, config) {
                Some((name, key)) => {
                    let has_key = k8s
                        .config_map(name)
                        .and_then(|cm| cm.data.as_ref())
                        .is_some_and(|d| d.contains_key(&key));
                    if !has_key {
                        problems.push(format!(
                            "{at}: --config {config}: ConfigMap {name} has no key {key}"
                        ));
                    }
                }
                None => problems.push(format!(
                    "{at}: --config {config} is not mounted from a ConfigMap"
                )),
            }
        }
        _ => {}
    }

    if c.readiness_probe.is_none() || c.liveness_probe.is_none() {
        problems.push(format!("{at}: needs a readinessProbe and a livenessProbe"));
    }
    let probes = [
        ("startupProbe", &c.startup_probe),
        ("readinessProbe", &c.readiness_probe),
        ("livenessProbe", &c.liveness_probe),
    ];
    for (kind, probe) in probes {
        let Some(probe) = probe else { continue };
        let Some(get) = &probe.http_get else {
            problems.push(format!("{at}: {kind} is not an httpGet"));
            continue;
        };
        let path = get.path.as_deref().unwrap_or("/");
        if !PROBE_PATHS.contains(&path) {
            problems.push(format!(
                "{at}: {kind} path {path} is none of {PROBE_PATHS:?}"
            ));
        }
        if !port_matches(c, &get.port) {
            problems.push(format!(
                "{at}: {kind} port {:?} is not a containerPort",
                get.port
            ));
        }
    }

    for env in c.env.iter().flatten() {
        let Some(from) = &env.value_from else {
            continue;
        };
        if let Some(r) = &from.secret_key_ref {
            match k8s.secret_keys(&r.name) {
                Some(keys) if keys.contains(&r.key) => {}
                Some(_) => problems.push(format!(
                    "{at}: env {}: Secret {} has no key {}",
                    env.name, r.name, r.key
                )),
                None => problems.push(format!("{at}: env {}: no Secret {}", env.name, r.name)),
            }
        }
        if let Some(r) = &from.config_map_key_ref {
            let found = k8s
                .config_map(&r.name)
                .and_then(|cm| cm.data.as_ref())
                .is_some_and(|d| d.contains_key(&r.key));
            if !found {
                problems.push(format!(
                    "{at}: env {}: no key {} in ConfigMap {}",
                    env.name, r.key, r.name
                ));
            }
        }
    }
    for from in c.env_from.iter().flatten() {
        if let Some(r) = &from.secret_ref
            && k8s.secret_keys(&r.name).is_none()
        {
            problems.push(format!("{at}: envFrom: no Secret {}", r.name));
        }
        if let Some(r) = &from.config_map_ref
            && k8s.config_map(&r.name).is_none()
        {
            problems.push(format!("{at}: envFrom: no ConfigMap {}", r.name));
        }
    }
    for mount in c.volume_mounts.iter().flatten() {
        if !pod.volumes.iter().flatten().any(|v| v.name == mount.name) {
            problems.push(format!("{at}: volumeMount {} names no volume", mount.name));
        }
    }

    let sc = c.security_context.clone().unwrap_or_default();
    let non_root = sc.run_as_non_root.or_else(|| {
        pod.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root)
    });
    let drops_all = sc
        .capabilities
        .as_ref()
        .and_then(|caps| caps.drop.as_ref())
        .is_some_and(|d| d.iter().any(|c| c == "ALL"));
    if non_root != Some(true)
        || sc.read_only_root_filesystem != Some(true)
        || sc.allow_privilege_escalation != Some(false)
        || !drops_all
    {
        problems.push(format!(
            "{at}: needs runAsNonRoot, readOnlyRootFilesystem, allowPrivilegeEscalation: false and capabilities.drop [ALL]"
        ));
    }
    let resources = c.resources.clone().unwrap_or_default();
    for (kind, quantities) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        let has = |r: &str| quantities.as_ref().is_some_and(|q| q.contains_key(r));
        if !has("cpu") || !has("memory") {
            problems.push(format!("{at}: resources.{kind} needs cpu and memory"));
        }
    }
}

/// Services, probes, the HPA, PDBs, ConfigMaps, Secrets and volumes refer to what exists.
fn cross_reference(k8s: &K8s) -> Vec<String> {
    let mut problems = Vec::new();
    let hpa_min: BTreeMap<String, i32> = k8s
        .deployed
        .iter()
        .filter_map(|m| match &m.object {
            Object::Hpa(h) => {
                let spec = &h.spec;
                Some((
                    spec.scale_target_ref.name.clone(),
                    spec.min_replicas.unwrap_or(1),
                ))
            }
            _ => None,
        })
        .collect();
    for (m, d) in k8s.deployments() {
        let spec = &d.spec;
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        if !selects(&selector, &pod_labels(d)) {
            problems.push(format!(
                "{}: the selector does not select the pod template's labels",
                m.at
            ));
        }
        let Some(pod) = pod_spec(d) else {
            problems.push(format!("{}: no pod spec", m.at));
            continue;
        };
        for c in &pod.containers {
            check_container(k8s, &m.at, pod, c, &mut problems);
        }
        for v in pod.volumes.iter().flatten() {
            if let Some(cm) = &v.config_map {
                match k8s.config_map(&cm.name) {
                    None => problems.push(format!(
                        "{}: volume {}: no ConfigMap {}",
                        m.at, v.name, cm.name
                    )),
                    Some(config_map) => {
                        for item in cm.items.iter().flatten() {
                            if !config_map
                                .data
                                .as_ref()
                                .is_some_and(|d| d.contains_key(&item.key))
                            {
                                problems.push(format!(
                                    "{}: volume {}: ConfigMap {} has no key {}",
                                    m.at, v.name, cm.name, item.key
                                ));
                            }
                        }
                    }
                }
            }
            if let Some(s) = &v.secret {
                let name = s.secret_name.as_deref().unwrap_or("");
                if k8s.secret_keys(name).is_none() {
                    problems.push(format!("{}: volume {}: no Secret {name}", m.at, v.name));
                }
            }
            if let Some(claim) = &v.persistent_volume_claim {
                // Replicas land on several nodes: they need a volume many nodes can mount.
                let replicas = spec
                    .replicas
                    .or_else(|| hpa_min.get(&m.name).copied())
                    .unwrap_or(1);
                match k8s.pvc(&claim.claim_name) {
                    None => problems.push(format!(
                        "{}: volume {}: no PersistentVolumeClaim {}",
                        m.at, v.name, claim.claim_name
                    )),
                    Some(pvc) => {
                        let modes = pvc
                            .spec
                            .as_ref()
                            .and_then(|s| s.access_modes.clone())
                            .unwrap_or_default();
                        let shared = modes
                            .iter()
                            .any(|a| a == "ReadWriteMany" || a == "ReadOnlyMany");
                        if replicas > 1 && !shared {
                            problems.push(format!(
                                "{}: {replicas} replicas mount PersistentVolumeClaim {} with access modes {modes:?}: needs ReadWriteMany or ReadOnlyMany",
                                m.at, claim.claim_name
                            ));
                        }
                    }
                }
            }
        }
        if hpa_min.contains_key(&m.name) && spec.replicas.is_some() {
            problems.push(format!(
                "{}: scaled by an HPA, so it must not set replicas (every apply would reset them)",
                m.at
            ));
        }
    }

    for m in &k8s.deployed {
        match &m.object {
            Object::Service(s) => {
                let spec = s.spec.clone().unwrap_or_default();
                let selector = spec.selector.unwrap_or_default();
                let targets: Vec<&Deployment> = k8s
                    .deployments()
                    .map(|(_, d)| d)
                    .filter(|d| selects(&selector, &pod_labels(d)))
                    .collect();
                if targets.is_empty() {
                    problems.push(format!(
                        "{}: the selector {selector:?} matches no Deployment's pods",
                        m.at
                    ));
                }
                for port in spec.ports.iter().flatten() {
                    let target = port
                        .target_port
                        .clone()
                        .unwrap_or(IntOrString::Int(port.port));
                    for d in &targets {
                        let containers = pod_spec(d)
                            .map(|p| p.containers.as_slice())
                            .unwrap_or_default();
                        if !containers.iter().any(|c| port_matches(c, &target)) {
                            problems.push(format!(
                                "{}: port {}: targetPort {target:?} is no containerPort",
                                m.at, port.port
                            ));
                        }
                    }
                }
            }
            Object::Hpa(h) => {
                let spec = &h.spec;
                let target = &spec.scale_target_ref;
                if target.kind != "Deployment" || target.name != "gateway" {
                    problems.push(format!(
                        "{}: scales {} {}, not the Deployment gateway",
                        m.at, target.kind, target.name
                    ));
                }
                match k8s.deployment(&target.name) {
                    None => problems.push(format!("{}: no Deployment {}", m.at, target.name)),
                    Some(d) => {
                        let containers = pod_spec(d)
                            .map(|p| p.containers.as_slice())
                            .unwrap_or_default();
                        let cpu_requests = containers.iter().all(|c| {
                            c.resources
                                .as_ref()
                                .and_then(|r| r.requests.as_ref())
                                .is_some_and(|r| r.contains_key("cpu"))
                        });
                        if !cpu_requests {
                            problems.push(format!(
                                "{}: CPU utilization needs cpu requests on every container",
                                m.at
                            ));
                        }
                    }
                }
            }
            Object::Pdb(p) => {
                let spec = p.spec.clone().unwrap_or_default();
                let selector = spec
                    .selector
                    .and_then(|s| s.match_labels)
                    .unwrap_or_default();
                let targets: Vec<(&Manifest, &Deployment)> = k8s
                    .deployments()
                    .filter(|(_, d)| selects(&selector, &pod_labels(d)))
                    .collect();
                if targets.is_empty() {
                    problems.push(format!(
                        "{}: the selector {selector:?} matches no Deployment's pods",
                        m.at
                    ));
                }
                for (dm, d) in targets {
                    let replicas = d
                        .spec
                        .replicas
                        .or_else(|| hpa_min.get(&dm.name).copied())
                        .unwrap_or(1);
                    if let Some(IntOrString::Int(min)) = &spec.min_available
                        && *min >= replicas
                    {
                        problems.push(format!(
                            "{}: minAvailable {min} with {replicas} replicas blocks every eviction",
                            m.at
                        ));
                    }
                }
            }
            Object::Secret(_) => problems.push(format!(
                "{}: Secrets stay out of the applied manifests (see {SECRET_EXAMPLE})",
                m.at
            )),
            Object::Deployment(_) | Object::ConfigMap(_) | Object::Pvc(_) => {}
        }
    }

    // secret.example.yaml documents exactly the keys the manifests read.
    let used: BTreeSet<String> = k8s
        .deployments()
        .filter_map(|(_, d)| pod_spec(d))
        .flat_map(|p| p.containers.iter())
        .flat_map(|c| c.env.iter().flatten())
        .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .filter(|r| r.name == EXTERNAL_SECRET)
        .map(|r| r.key.clone())
        .collect();
    let documented = k8s.secret_keys(EXTERNAL_SECRET).unwrap_or_default();
    if used != documented {
        problems.push(format!(
            "{SECRET_EXAMPLE} documents the keys {documented:?}, the manifests read {used:?}"
        ));
    }
    problems
}

pub(super) fn k8s_container<'a>(k8s: &'a K8s, deployment: &str) -> (&'a PodSpec, &'a Container) {
    let pod = k8s
        .deployment(deployment)
        .and_then(pod_spec)
        .unwrap_or_else(|| panic!("deploy/k8s: no Deployment {deployment}"));
    (pod, &pod.containers[0])
}

#[test]
fn k8s_manifests_round_trip_through_the_api_types() {
    let mut problems = Vec::new();
    let k8s = load_k8s(&mut problems);
    assert_no_problems("deploy/k8s", &problems);
    let kinds: BTreeSet<String> = k8s
        .deployed
        .iter()
        .map(|m| format!("{} {}", m.object.kind(), m.name))
        .collect();
    for expected in [
        "Deployment serve",
        "Deployment gateway",
        "Service serve",
        "Service gateway",
        "HorizontalPodAutoscaler gateway",
        "PodDisruptionBudget serve",
        "PodDisruptionBudget gateway",
        "ConfigMap kiln-gateway",
        "PersistentVolumeClaim kiln-models",
    ] {
        assert!(
            kinds.contains(expected),
            "deploy/k8s: no {expected} in {kinds:?}"
        );
    }
    assert!(
        k8s.example_secret.is_some(),
        "deploy/k8s/{SECRET_EXAMPLE}: no Secret {EXTERNAL_SECRET}"
    );
}

#[test]
fn a_misspelt_or_unknown_field_is_caught() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\ndata: {a: b}\n---\n\
        apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n        - name: web\n          image: kiln\n          readinessProb: {httpGet: {path: /ready, port: 8000}}\n---\n\
        apiVersion: apps/v1\nkind: Deploymnet\nmetadata: {name: typo}\n";
    let mut problems = Vec::new();
    let manifests = parse_manifests("inline.yaml", text, &mut problems);
    assert_eq!(
        manifests.len(),
        1,
        "only the ConfigMap is sound: {problems:?}"
    );
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].starts_with(
            "inline.yaml document 1: $.spec.template.spec.containers[0].readinessProb:"
        ),
        "{}",
        problems[0]
    );
    assert!(
        problems[1].contains("document 2") && problems[1].contains("Deploymnet"),
        "{}",
        problems[1]
    );
    // A value the type cannot hold as written is a difference too.
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: http, protocl: TCP}]}\n";
    let mut problems = Vec::new();
    parse_manifests("svc.yaml", text, &mut problems);
    assert!(
        problems.len() == 1 && problems[0].contains("$.spec.ports[0].protocl"),
        "{problems:?}"
    );
}

#[test]
fn k8s_cross_references_hold() {
    let mut problems = Vec::new();
    let k8s = load_k8s(&mut problems);
    problems.extend(cross_reference(&k8s));
    assert_no_problems("deploy/k8s cross-references", &problems);
}

#[test]
fn cross_reference_catches_a_dangling_reference() {
    let mut problems = Vec::new();
    let mut k8s = load_k8s(&mut problems);
    for m in &mut k8s.deployed {
        if let Object::Service(s) = &mut m.object
            && m.name == "serve"
        {
            let ports = s.spec.as_mut().unwrap().ports.as_mut().unwrap();
            ports[0].target_port = Some(IntOrString::String("htp".into()));
        }
    }
    let problems = cross_reference(&k8s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("targetPort") && p.contains("htp")),
        "{problems:?}"
    );
}

#[test]
fn kustomization_applies_every_manifest_but_the_example() {
    let kustomization: Value = serde_yaml_ng::from_str(&read("deploy/k8s/kustomization.yaml"))
        .expect("kustomization.yaml");
    let listed: BTreeSet<String> = strings(kustomization.get("resources"))
        .into_iter()
        .collect();
    let present: BTreeSet<String> = k8s_yaml_files()
        .into_iter()
        .filter(|f| f != KUSTOMIZATION && f != SECRET_EXAMPLE)
        .collect();
    assert_eq!(
        listed, present,
        "deploy/k8s/kustomization.yaml `resources` against the files present"
    );

    // kustomize only reads files in or below the kustomization's directory.
    let mut problems = Vec::new();
    for generator in ["configMapGenerator", "secretGenerator"] {
        let entries = kustomization.get(generator).and_then(Value::as_array);
        for entry in entries.into_iter().flatten() {
            let mut files = strings(entry.get("files"));
            files.extend(strings(entry.get("envs")));
            for file in files {
                let path = file.split_once('=').map_or(file.as_str(), |(_, p)| p);
                if path.starts_with('/') || path.split('/').any(|s| s == "..") {
                    problems.push(format!(
                        "{generator}: {path} is outside deploy/k8s (kustomize refuses it)"
                    ));
                } else if !repo_root().join("deploy/k8s").join(path).is_file() {
                    problems.push(format!("{generator}: {path} does not exist"));
                }
            }
        }
    }
    // `images` retags the kiln containers: its name must be theirs.
    let mut k8s_problems = Vec::new();
    let k8s = load_k8s(&mut k8s_problems);
    let images: BTreeSet<String> = k8s
        .deployments()
        .filter_map(|(_, d)| pod_spec(d))
        .flat_map(|p| p.containers.iter())
        .filter_map(|c| c.image.clone())
        .collect();
    for image in kustomization
        .get("images")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = image.get("name").and_then(Value::as_str).unwrap_or("");
        if !images.contains(name) {
            problems.push(format!(
                "images: {name} is no container's image ({images:?})"
            ));
        }
    }
    assert_no_problems("deploy/k8s/kustomization.yaml", &problems);
}
