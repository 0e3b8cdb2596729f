//! The Dockerfile and .dockerignore.

use std::collections::BTreeSet;
use std::path::Path;

use super::{assert_no_problems, parse_kiln, read, repo_root};

#[derive(Debug)]
struct Instruction {
    /// 0 for the first FROM's stage.
    stage: usize,
    keyword: String,
    args: String,
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let mut instructions = Vec::new();
    let mut stage = None::<usize>;
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            pending.push_str(body);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let line = std::mem::take(&mut pending);
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stage = Some(stage.map_or(0, |s| s + 1));
        }
        instructions.push(Instruction {
            stage: stage.unwrap_or(0),
            keyword,
            args: args.trim().to_string(),
        });
    }
    instructions
}

/// A `.dockerignore`: patterns in order, the last one matching a path (or a directory above
/// it) decides, `!` re-includes; `*` and `?` within a path segment, `**` across segments.
struct DockerIgnore {
    rules: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    fn parse(text: &str) -> Self {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (exclude, pattern) = match l.strip_prefix('!') {
                    Some(p) => (false, p),
                    None => (true, l),
                };
                let pattern = pattern.trim_start_matches("./").trim_matches('/');
                (exclude, pattern.split('/').map(String::from).collect())
            })
            .collect();
        Self { rules }
    }

    fn excludes(&self, path: &str) -> bool {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut excluded = false;
        for (exclude, pattern) in &self.rules {
            if (1..=segments.len()).any(|n| match_segments(pattern, &segments[..n])) {
                excluded = *exclude;
            }
        }
        excluded
    }
}

fn match_segments(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|i| match_segments(rest, &path[i..]))
        }
        Some((first, rest)) => path.split_first().is_some_and(|(head, tail)| {
            glob(first.as_bytes(), head.as_bytes()) && match_segments(rest, tail)
        }),
    }
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((b'?', rest)) => !text.is_empty() && glob(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

/// Files under `dir` (relative to the repo root) that a build needs: manifests and sources.
fn build_inputs(root: &Path, dir: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
        out.push(dir.to_string());
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{dir}/{name}");
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if name != "target" {
                build_inputs(root, &rel, out);
            }
        } else if name == "Cargo.toml" || name.ends_with(".rs") {
            out.push(rel);
        }
    }
}

/// A JSON-array (exec form) argument list.
fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str(args).ok()
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_builds_from_the_context() {
    let root = repo_root();
    let instructions = dockerfile_instructions(&read("Dockerfile"));
    let ignore = DockerIgnore::parse(&read(".dockerignore"));
    let mut problems = Vec::new();
    let stages: Vec<&Instruction> = instructions
        .iter()
        .filter(|i| i.keyword == "FROM")
        .collect();
    if stages.len() < 2 {
        problems.push(format!(
            "{} FROM: expected a build stage and a runtime stage",
            stages.len()
        ));
    }
    let stage_names: Vec<String> = stages
        .iter()
        .filter_map(|i| {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            let at = words.iter().position(|w| w.eq_ignore_ascii_case("as"))?;
            words.get(at + 1).map(|s| s.to_string())
        })
        .collect();
    let last = stages.len().saturating_sub(1);
    let final_stage = |keyword: &str| -> Vec<&Instruction> {
        instructions
            .iter()
            .filter(|i| i.stage == last && i.keyword == keyword)
            .collect()
    };

    match final_stage("USER").last() {
        None => problems.push("the final stage sets no USER (it would run as root)".into()),
        Some(user) => {
            let ids: Vec<Option<u32>> = user.args.split(':').map(|id| id.parse().ok()).collect();
            if ids.iter().any(|id| id.is_none_or(|n| n == 0)) {
                problems.push(format!(
                    "USER {}: expected a numeric non-root uid[:gid] (runAsNonRoot checks it)",
                    user.args
                ));
            }
        }
    }
    match final_stage("HEALTHCHECK").last() {
        None => problems.push("the final stage has no HEALTHCHECK".into()),
        Some(h) => {
            let command = h
                .args
                .split_once("CMD")
                .map(|(_, c)| c.trim())
                .and_then(exec_form);
            match command {
                Some(argv) => {
                    if let Err(e) = parse_kiln(&argv) {
                        problems.push(format!("HEALTHCHECK: {e}"));
                    }
                }
                None => problems.push(format!(
                    "HEALTHCHECK {}: expected CMD [\"kiln\", \"healthcheck\", …]",
                    h.args
                )),
            }
        }
    }
    let volumes: Vec<String> = final_stage("VOLUME")
        .iter()
        .flat_map(|v| {
            exec_form(&v.args)
                .unwrap_or_else(|| v.args.split_whitespace().map(String::from).collect())
        })
        .collect();
    if !volumes.iter().any(|v| v == "/models") {
        problems.push(format!("VOLUME {volumes:?}: expected /models"));
    }
    let exposed: BTreeSet<String> = final_stage("EXPOSE")
        .iter()
        .flat_map(|e| e.args.split_whitespace().map(String::from))
        .collect();
    for port in ["8000", "8080"] {
        if !exposed.contains(port) {
            problems.push(format!("EXPOSE lacks {port}"));
        }
    }
    let entrypoint = final_stage("ENTRYPOINT")
        .last()
        .and_then(|e| exec_form(&e.args));
    if entrypoint != Some(vec!["kiln".to_string()]) {
        problems.push(format!("ENTRYPOINT {entrypoint:?}: expected [\"kiln\"]"));
    }
    match final_stage("CMD").last().and_then(|c| exec_form(&c.args)) {
        Some(cmd) => {
            let argv: Vec<String> = std::iter::once("kiln".to_string()).chain(cmd).collect();
            if let Err(e) = parse_kiln(&argv) {
                problems.push(format!("CMD: {e}"));
            }
        }
        None => problems.push("CMD: expected the exec form [\"up\", …]".into()),
    }
    if !instructions.iter().any(|i| {
        i.keyword == "RUN"
            && i.args
                .contains("cargo build --release --locked -p kiln-cli")
    }) {
        problems.push("no `cargo build --release --locked -p kiln-cli`".into());
    }

    for copy in instructions
        .iter()
        .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
    {
        let words: Vec<String> = exec_form(&copy.args)
            .unwrap_or_else(|| copy.args.split_whitespace().map(String::from).collect());
        if let Some(from) = words.iter().find_map(|w| w.strip_prefix("--from=")) {
            if !stage_names.iter().any(|s| s == from) {
                problems.push(format!("COPY --from={from}: no stage {from}"));
            }
            continue;
        }
        let paths: Vec<&String> = words.iter().filter(|w| !w.starts_with("--")).collect();
        let Some((_, sources)) = paths.split_last() else {
            continue;
        };
        for source in sources {
            let source = source.trim_end_matches('/').trim_start_matches("./");
            if !root.join(source).exists() {
                problems.push(format!("COPY {source}: not in the repository"));
                continue;
            }
            let mut inputs = Vec::new();
            if root.join(source).is_dir() {
                build_inputs(&root, source, &mut inputs);
            } else {
                inputs.push(source.to_string());
            }
            let left_out: Vec<&String> = inputs
                .iter()
                .filter(|p| ignore.excludes(p))
                .take(3)
                .collect();
            if ignore.excludes(source) || !left_out.is_empty() {
                problems.push(format!(
                    "COPY {source}: .dockerignore leaves it out of the build context ({left_out:?})"
                ));
            }
        }
    }
    assert_no_problems("Dockerfile", &problems);

    // What stays out of the context.
    for path in [
        "target/release/kiln",
        "runs/x",
        ".git/HEAD",
        "testdata/hf/llama/model.safetensors",
        "crates/kiln-cli/target/x",
    ] {
        assert!(
            ignore.excludes(path),
            ".dockerignore lets {path} into the build context"
        );
    }
}

#[test]
fn dockerignore_matching_follows_docker() {
    let ignore = DockerIgnore::parse("*\n!crates/\n**/target/\n!keep/**/x?.rs\n# c\n");
    assert!(ignore.excludes("README.md"));
    assert!(ignore.excludes("docs/a.md"));
    assert!(!ignore.excludes("crates/a/src/lib.rs"));
    assert!(ignore.excludes("crates/a/target/debug/x"));
    assert!(!ignore.excludes("keep/a/b/x1.rs"));
    assert!(ignore.excludes("keep/a/b/x12.rs"));
}
