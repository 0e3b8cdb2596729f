//! `kiln feedback export`: the feedback the gateway keeps (thumbs, scores, corrections, the
//! preferred one of `n` choices, side-by-side comparisons from the labelling page) turned into
//! training data in TRL's formats, for `kiln dpo`, `kiln sft` and a KTO trainer.
//!
//! The command is a thin shell over [`export`], which `kiln loop` calls too. `export` reads the
//! store once ([`Store::feedback_for_export`]: feedback of `no_train` keys never leaves the
//! query), maps the feedback to rows with [`build_rows`], a pure function kept apart so the
//! mapping is tested without a database, and writes the file atomically.
//!
//! Decisions worth knowing:
//! - **One kind per file.** A chat request's prompt (its `messages`) gives conversational rows,
//!   a completion request's prompt standard text rows; TRL's readers take one kind per dataset,
//!   so the majority kind wins (conversational on a tie) and the other rows are dropped.
//! - **Thumbs and scores are about the first (or only) reply** of a request; the latest vote of
//!   a key on a request replaces its earlier ones.
//! - **Scores are read on [0, 1]**: `--score-threshold` (0.5) splits desirable from undesirable
//!   for KTO and approved from not for SFT; DPO pairs the highest and the lowest score given to
//!   replies of one prompt.
//! - **Personal data is scrubbed again** on the way out, with the gateway's detectors and the
//!   custom patterns of its `guardrails` section: content captured before a pattern was added,
//!   or by a gateway with other settings, never reaches a training file unscrubbed.
//! - **Nothing is silently lost**: every feedback record or row left out is counted under its
//!   reason in [`ExportSummary::dropped`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use kiln_gateway::config::GatewayConfig;
use kiln_gateway::guard::Scrubber;
use kiln_guard::policy::GuardrailsConfig;
use kiln_monitor::cost::days_from_civil;
use kiln_monitor::feedback::{FeedbackExport, FeedbackItem, Thumbs};
use kiln_monitor::store::{ContentRecord, Store};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Subcommand, Debug)]
pub enum FeedbackCommand {
    /// Turn the gateway's stored feedback into DPO pairs, KTO rows or SFT examples (JSONL).
    #[command(after_help = EXPORT_HELP)]
    Export(ExportArgs),
}

const EXPORT_HELP: &str = "\
Formats (TRL's):
  dpo  {\"prompt\", \"chosen\", \"rejected\"}   corrections, preferred choices, comparisons,
                                          thumbs up vs down and high vs low scores on one prompt
  kto  {\"prompt\", \"completion\", \"label\"}  every signal as a desirable or undesirable reply
  sft  {\"prompt\", \"completion\"}           corrections, preferred and approved replies
Prompts are message lists for chat requests, strings for completion requests.
Example:
  kiln feedback export --store sqlite://kiln-gateway.db --since 7d --format dpo --out data/dpo.jsonl
  kiln dpo --config dpo.yaml   # with dataset_path: data/dpo.jsonl";

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The gateway's store: `sqlite://PATH` or `postgres://…` (its `store.url`).
    #[arg(long, value_name = "URL")]
    store: String,
    /// Only feedback given since then: `30m`, `24h`, `7d` ago, an RFC 3339 time or a UTC
    /// date `YYYY-MM-DD` (default: all of it).
    #[arg(long, value_name = "SPEC")]
    since: Option<String>,
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Where to write the rows (JSON lines; parent directories are created).
    #[arg(long, value_name = "FILE.jsonl")]
    out: PathBuf,
    /// Scores are read on [0, 1]: at or above the threshold a reply is desirable (KTO) or
    /// kept (SFT).
    #[arg(long, value_name = "T", default_value_t = 0.5)]
    score_threshold: f64,
    /// The gateway's configuration, whose `guardrails` section (custom PII patterns, the
    /// allow-list) the export scrubs with; the built-in detectors without it.
    #[arg(long, value_name = "GATEWAY.yaml")]
    gateway_config: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// The training-data format written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// Preference pairs `{"prompt", "chosen", "rejected"}` (`kiln dpo`, reward modelling).
    Dpo,
    /// Unpaired preference rows `{"prompt", "completion", "label"}` (KTO).
    Kto,
    /// Prompt-completion rows `{"prompt", "completion"}` (`kiln sft`).
    Sft,
}

impl ExportFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dpo => "dpo",
            Self::Kto => "kto",
            Self::Sft => "sft",
        }
    }
}

/// What [`export`] reads, maps and writes.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The store URL (`sqlite://PATH` or `postgres://…`).
    pub store: String,
    /// Only feedback given at or after this time; all of it when `None`.
    pub since: Option<SystemTime>,
    pub format: ExportFormat,
    /// The JSONL file to write (atomically; parent directories created).
    pub out: PathBuf,
    /// Scores at or above it are desirable (KTO) or kept (SFT); scores are read on [0, 1].
    pub score_threshold: f64,
    /// The guardrails whose PII detectors (custom patterns and allow-list included) every
    /// exported text goes through again.
    pub scrubber_config: GuardrailsConfig,
}

/// What an export wrote, and what it left out.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    pub format: ExportFormat,
    pub out: PathBuf,
    /// Feedback records read (those of `no_train` keys excluded).
    pub feedback: usize,
    /// Rows written.
    pub rows: usize,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// Rows written, by the signal they came from: `correction`, `preferred_index`,
    /// `compared_with`, `thumbs`, `score`.
    pub by_signal: BTreeMap<String, usize>,
    /// DPO: `pairs`; KTO: `desirable` and `undesirable`; SFT: `examples`.
    pub balance: BTreeMap<String, usize>,
    /// Feedback records, votes or rows left out, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Feedback of `no_train` keys in the period, left out by the store's query.
    pub excluded_no_train: u64,
    /// Rows in which the re-scrub replaced something.
    pub rescrubbed: usize,
    /// `conversational`, `standard`, or `empty` when no row was written.
    pub kind: String,
}

pub fn run(cmd: FeedbackCommand) -> Result<()> {
    match cmd {
        FeedbackCommand::Export(args) => export_command(&args),
    }
}

fn export_command(args: &ExportArgs) -> Result<()> {
    let since = args
        .since
        .as_deref()
        .map(|s| parse_since(s).with_context(|| format!("--since {s}")))
        .transpose()?;
    let scrubber_config = match &args.gateway_config {
        Some(path) => {
            GatewayConfig::load(path)
                .with_context(|| format!("--gateway-config {}", path.display()))?
                .guardrails
        }
        None => GuardrailsConfig::default(),
    };
    let summary = export(&ExportOptions {
        store: args.store.clone(),
        since,
        format: args.format,
        out: args.out.clone(),
        score_threshold: args.score_threshold,
        scrubber_config,
    })?;
    eprint!("{}", summary_text(&summary));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// Reads the feedback, maps it to rows in `opts.format`, re-scrubs them and writes the file.
/// Synchronous: it runs its own tokio runtime (on a thread of its own when called from inside
/// one). An export with no rows writes an empty file.
pub fn export(opts: &ExportOptions) -> Result<ExportSummary> {
    if !opts.score_threshold.is_finite() {
        bail!(
            "--score-threshold: expected a number (scores are read on [0, 1]), got {}",
            opts.score_threshold
        );
    }
    let scrubber = Scrubber::new(&opts.scrubber_config).context("the PII scrubber")?;
    let since = opts.since.unwrap_or(UNIX_EPOCH);
    let data = if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(|| read_feedback(&opts.store, since))
                .join()
                .map_err(|_| anyhow!("reading the feedback: the reader thread panicked"))?
        })?
    } else {
        read_feedback(&opts.store, since)?
    };
    let mut built = build_rows(&data.items, opts.format, opts.score_threshold, &|t| {
        scrubber.scrub(t)
    });
    if let Some(system) = &opts.scrubber_config.system_prompt {
        for row in &mut built.rows {
            restore_system_prompt(row, system);
        }
    }
    let mut bytes = Vec::new();
    for row in &built.rows {
        serde_json::to_writer(&mut bytes, row)?;
        bytes.push(b'\n');
    }
    write_atomically(&opts.out, &bytes)?;
    Ok(ExportSummary {
        format: opts.format,
        out: opts.out.clone(),
        feedback: data.items.len(),
        rows: built.rows.len(),
        sha256: hex(&Sha256::digest(&bytes)),
        by_signal: built.by_signal,
        balance: built.balance,
        dropped: built.dropped,
        excluded_no_train: data.excluded_no_train,
        rescrubbed: built.rescrubbed,
        kind: built.kind.to_string(),
    })
}

/// Puts the gateway's immutable system prompt back at the head of a chat row's prompt: the
/// gateway captures prompts without it (it is the same for every request), and the model is
/// served with it, so it trains with it too.
fn restore_system_prompt(row: &mut Value, system: &str) {
    let Some(Value::Array(messages)) = row.get_mut("prompt") else {
        return;
    };
    let has_system = messages
        .first()
        .is_some_and(|m| m.get("role").and_then(Value::as_str) == Some("system"));
    if !has_system {
        messages.insert(0, serde_json::json!({"role": "system", "content": system}));
    }
}

fn read_feedback(store: &str, since: SystemTime) -> Result<FeedbackExport> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let store = Store::connect(store).await?;
        let data = store.feedback_for_export(since).await;
        store.close().await;
        data
    })
}

/// The summary as the command prints it on stderr.
pub fn summary_text(s: &ExportSummary) -> String {
    let mut t = String::new();
    let balance = match s.format {
        ExportFormat::Dpo => format!("{} pairs", s.balance.get("pairs").unwrap_or(&0)),
        ExportFormat::Kto => format!(
            "{} desirable / {} undesirable",
            s.balance.get("desirable").unwrap_or(&0),
            s.balance.get("undesirable").unwrap_or(&0)
        ),
        ExportFormat::Sft => format!("{} examples", s.balance.get("examples").unwrap_or(&0)),
    };
    if s.rows == 0 {
        t.push_str(&format!(
            "feedback export ({}): {} feedback records, no training rows: wrote an empty file\n",
            s.format.as_str(),
            s.feedback
        ));
    } else {
        t.push_str(&format!(
            "feedback export ({}, {}): {} feedback records -> {} rows: {balance}\n",
            s.format.as_str(),
            s.kind,
            s.feedback,
            s.rows
        ));
    }
    let list = |m: &BTreeMap<String, usize>| {
        m.iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !s.by_signal.is_empty() {
        t.push_str(&format!("  from: {}\n", list(&s.by_signal)));
    }
    if !s.dropped.is_empty() {
        t.push_str(&format!("  dropped: {}\n", list(&s.dropped)));
    }
    t.push_str(&format!(
        "  no_train feedback excluded: {}\n  rows changed by the PII re-scrub: {}\n",
        s.excluded_no_train, s.rescrubbed
    ));
    t.push_str(&format!(
        "  wrote {} (sha256 {})\n",
        s.out.display(),
        s.sha256
    ));
    t
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`, so readers
/// see the old file or the whole new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = path.file_name() else {
        bail!("--out {}: expected a file path", path.display());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}-{:08x}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // Best effort: the temporary file may not exist.
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// --since

/// `30m`, `24h`, `7d`, `2w`, `90s` (that long ago), an RFC 3339 time (`2025-06-01T12:00:00Z`,
/// `2025-06-01T14:00:00+02:00`) or a date `YYYY-MM-DD` (its UTC midnight).
pub fn parse_since(spec: &str) -> Result<SystemTime> {
    let s = spec.trim();
    let bad = || {
        anyhow!(
            "`{spec}`: expected a time ago (`30m`, `24h`, `7d`), an RFC 3339 time \
             (`2025-06-01T12:00:00Z`) or a UTC date (`2025-06-01`)"
        )
    };
    if let Some(ago) = parse_ago(s) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| anyhow!("`{spec}`: too long ago"));
    }
    let (secs, nanos) = parse_timestamp(s).ok_or_else(bad)?;
    let secs = u64::try_from(secs).map_err(|_| anyhow!("`{spec}`: before 1970"))?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// `N` followed by `s`, `m`, `h`, `d` or `w`; `N` a non-negative decimal number.
fn parse_ago(s: &str) -> Option<Duration> {
    let unit = s.chars().last()?;
    let per = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86_400.0,
        'w' => 604_800.0,
        _ => return None,
    };
    let number = &s[..s.len() - 1];
    if number.is_empty()
        || !number.chars().all(|c| c.is_ascii_digit() || c == '.')
        || !number.starts_with(|c: char| c.is_ascii_digit())
    {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    Duration::try_from_secs_f64(n * per).ok()
}

/// Seconds and nanoseconds since the Unix epoch of an RFC 3339 time or a `YYYY-MM-DD` date.
fn parse_timestamp(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    if b.len() < 10 || !sep(4, b'-') || !sep(7, b'-') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if b.len() == 10 {
        return Some((days * 86_400, 0));
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) || !sep(13, b':') || !sep(16, b':') {
        return None;
    }
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u32;
    if sep(i, b'.') {
        let start = i + 1;
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == start {
            return None;
        }
        let digits = &s[start..end.min(start + 9)];
        let scale = 10u32.pow(u32::try_from(9 - digits.len()).ok()?);
        nanos = digits.parse::<u32>().ok()? * scale;
        i = end;
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && sep(i + 3, b':') => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let offset = oh * 3600 + om * 60;
            if *sign == b'+' { offset } else { -offset }
        }
        _ => return None,
    };
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some((secs, nanos))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// ---------------------------------------------------------------------------------------------
// Feedback → rows

/// Reasons a feedback record, a vote or a row is left out.
pub mod reason {
    pub const NO_CONTENT: &str = "no captured content (store.capture_content off?)";
    pub const NO_REPLY: &str = "no captured reply";
    pub const NO_SIGNAL: &str = "no thumbs, score, correction, preferred_index or comparison";
    pub const NOT_ENOUGH_CHOICES: &str = "preferred_index without n >= 2 captured choices";
    pub const INDEX_OUT_OF_RANGE: &str = "preferred_index beyond the captured choices";
    pub const NO_OTHER: &str = "compared request has no captured content";
    pub const OTHER_PROMPT: &str = "compared requests have different prompts";
    pub const THUMBS_SUPERSEDED: &str = "thumbs replaced by a later vote of the same key";
    pub const SCORE_SUPERSEDED: &str = "score replaced by a later score of the same key";
    pub const THUMBS_UNMATCHED: &str = "thumbs without an opposite vote on the same prompt";
    pub const SCORE_UNMATCHED: &str = "score without a different score on the same prompt";
    pub const SCORE_MIDDLE: &str = "score neither the highest nor the lowest on its prompt";
    pub const THUMBS_DOWN: &str = "thumbs down (SFT keeps approved replies)";
    pub const LOW_SCORE: &str = "score below --score-threshold (SFT keeps approved replies)";
    pub const EMPTY: &str = "empty text";
    pub const SAME: &str = "chosen and rejected are the same";
    pub const OTHER_KIND: &str = "other prompt kind";
    pub const DUPLICATE: &str = "duplicate";
}

/// The feedback signal a row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Correction,
    Preferred,
    Compared,
    Thumbs,
    Score,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Self::Correction => "correction",
            Self::Preferred => "preferred_index",
            Self::Compared => "compared_with",
            Self::Thumbs => "thumbs",
            Self::Score => "score",
        }
    }
}

/// A captured prompt: a chat request's messages, or a completion request's text.
#[derive(Debug, Clone, PartialEq)]
enum Prompt {
    Text(String),
    Messages(Vec<Value>),
}

impl Prompt {
    /// Messages when `raw` is a non-empty JSON list of objects with a string `role`.
    fn parse(raw: &str) -> Self {
        if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(raw)
            && !items.is_empty()
            && items
                .iter()
                .all(|m| m.get("role").is_some_and(Value::is_string))
        {
            return Self::Messages(items);
        }
        Self::Text(raw.to_string())
    }

    fn is_conversational(&self) -> bool {
        matches!(self, Self::Messages(_))
    }
}

/// What one signal says, before the format is chosen.
enum Body {
    /// `chosen` is better than each of `rejected` (possibly none, when the worse reply was not
    /// captured: KTO and SFT still use `chosen`).
    Better {
        chosen: String,
        rejected: Vec<String>,
    },
    /// One pair (DPO only).
    Pair { chosen: String, rejected: String },
    /// One reply judged on its own.
    Judged { completion: String, good: bool },
}

/// A row to be, in no format yet.
struct Candidate {
    signal: Signal,
    prompt: Prompt,
    replies: Replies,
}

enum Replies {
    Pair { chosen: String, rejected: String },
    Unpaired { completion: String, label: bool },
    Single { completion: String },
}

/// The rows of an export and its counts (everything of [`ExportSummary`] but the file).
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub rows: Vec<Value>,
    /// `conversational`, `standard`, or `empty`.
    pub kind: &'static str,
    pub by_signal: BTreeMap<String, usize>,
    pub balance: BTreeMap<String, usize>,
    pub dropped: BTreeMap<String, usize>,
    pub rescrubbed: usize,
}

/// Reply `i` of a request: `choices[i]` when it asked for several, else `completion` for 0.
fn reply(c: &ContentRecord, i: usize) -> Option<&str> {
    if c.choices.is_empty() {
        c.completion.as_deref().filter(|_| i == 0)
    } else {
        c.choices.get(i).map(String::as_str)
    }
}

/// Votes (thumbs or scores) on the replies to one prompt.
struct Group<T> {
    prompt: Prompt,
    votes: Vec<(T, String)>,
}

/// Groups in order of first appearance, keyed by (tenant, prompt as captured).
struct Groups<T> {
    index: HashMap<(String, String), usize>,
    groups: Vec<Group<T>>,
}

impl<T> Groups<T> {
    fn new() -> Self {
        Self {
            index: HashMap::new(),
            groups: Vec::new(),
        }
    }

    fn push(&mut self, c: &ContentRecord, vote: T, text: String) {
        let key = (c.tenant.clone(), c.prompt.clone());
        let i = *self.index.entry(key).or_insert_with(|| {
            self.groups.push(Group {
                prompt: Prompt::parse(&c.prompt),
                votes: Vec::new(),
            });
            self.groups.len() - 1
        });
        self.groups[i].votes.push((vote, text));
    }
}

/// Maps feedback to rows of `format` (the rules are in `docs/feedback.md`), passing every text
/// through `scrub`. Pure: no I/O, the same rows for the same items.
pub fn build_rows(
    items: &[FeedbackItem],
    format: ExportFormat,
    score_threshold: f64,
    scrub: &dyn Fn(&str) -> String,
) -> Built {
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    let mut skip = |reason: &str, n: usize| {
        if n > 0 {
            *dropped.entry(reason.to_string()).or_default() += n;
        }
    };

    // The latest thumb (and score) of each key on each request; items come oldest first.
    let latest = |has: &dyn Fn(&FeedbackItem) -> bool| {
        let mut winner: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, item) in items.iter().enumerate().filter(|(_, it)| has(it)) {
            let f = &item.feedback;
            let key = (f.request_id.as_str(), f.key_id.as_str());
            match winner.get(&key) {
                Some(&w) if items[w].feedback.at > f.at => {}
                _ => {
                    winner.insert(key, i);
                }
            }
        }
        winner.into_values().collect::<HashSet<usize>>()
    };
    let thumb_winners = latest(&|it| it.feedback.thumbs.is_some());
    let score_winners = latest(&|it| it.feedback.score.is_some_and(f64::is_finite));

    let mut said: Vec<(Signal, Prompt, Body)> = Vec::new();
    let mut thumbs: Groups<bool> = Groups::new();
    let mut scores: Groups<f64> = Groups::new();
    for (idx, item) in items.iter().enumerate() {
        let f = &item.feedback;
        let Some(content) = &item.content else {
            skip(reason::NO_CONTENT, 1);
            continue;
        };
        let prompt = || Prompt::parse(&content.prompt);
        let mut any = false;
        if let Some(_other_id) = &f.compared_with {
            any = true;
            let chosen = f
                .correction
                .clone()
                .or_else(|| reply(content, 0).map(str::to_string));
            match (&item.other, chosen) {
                (None, _) => skip(reason::NO_OTHER, 1),
                (Some(other), _) if other.prompt != content.prompt => {
                    skip(reason::OTHER_PROMPT, 1);
                }
                (_, None) => skip(reason::NO_REPLY, 1),
                (Some(other), Some(chosen)) => match reply(other, 0) {
                    None => skip(reason::NO_REPLY, 1),
                    Some(rejected) => said.push((
                        Signal::Compared,
                        prompt(),
                        Body::Better {
                            chosen,
                            rejected: vec![rejected.to_string()],
                        },
                    )),
                },
            }
        } else if let Some(correction) = &f.correction {
            any = true;
            let i = f.preferred_index.map_or(0, |i| i as usize);
            let rejected: Vec<String> = reply(content, i).map(str::to_string).into_iter().collect();
            if rejected.is_empty() && format == ExportFormat::Dpo {
                skip(reason::NO_REPLY, 1);
            } else {
                said.push((
                    Signal::Correction,
                    prompt(),
                    Body::Better {
                        chosen: correction.clone(),
                        rejected,
                    },
                ));
            }
        } else if let Some(i) = f.preferred_index {
            any = true;
            let i = i as usize;
            if content.choices.len() < 2 {
                skip(reason::NOT_ENOUGH_CHOICES, 1);
            } else if i >= content.choices.len() {
                skip(reason::INDEX_OUT_OF_RANGE, 1);
            } else {
                let rejected = content
                    .choices
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, t)| t.clone())
                    .collect();
                said.push((
                    Signal::Preferred,
                    prompt(),
                    Body::Better {
                        chosen: content.choices[i].clone(),
                        rejected,
                    },
                ));
            }
        }
        if let Some(t) = f.thumbs {
            any = true;
            if !thumb_winners.contains(&idx) {
                skip(reason::THUMBS_SUPERSEDED, 1);
            } else if let Some(text) = reply(content, 0) {
                thumbs.push(content, t == Thumbs::Up, text.to_string());
            } else {
                skip(reason::NO_REPLY, 1);
            }
        }
        if let Some(s) = f.score.filter(|s| s.is_finite()) {
            any = true;
            if !score_winners.contains(&idx) {
                skip(reason::SCORE_SUPERSEDED, 1);
            } else if let Some(text) = reply(content, 0) {
                scores.push(content, s, text.to_string());
            } else {
                skip(reason::NO_REPLY, 1);
            }
        }
        if !any {
            skip(reason::NO_SIGNAL, 1);
        }
    }

    // Thumbs and scores: one row per vote, except DPO, which pairs the votes of one prompt.
    for group in thumbs.groups {
        if format == ExportFormat::Dpo {
            let texts = |up: bool| -> Vec<String> {
                let mut seen = HashSet::new();
                group
                    .votes
                    .iter()
                    .filter(|(u, t)| *u == up && seen.insert(t.clone()))
                    .map(|(_, t)| t.clone())
                    .collect()
            };
            let (ups, downs) = (texts(true), texts(false));
            if ups.is_empty() || downs.is_empty() {
                skip(reason::THUMBS_UNMATCHED, group.votes.len());
                continue;
            }
            for chosen in &ups {
                for rejected in &downs {
                    said.push((
                        Signal::Thumbs,
                        group.prompt.clone(),
                        Body::Pair {
                            chosen: chosen.clone(),
                            rejected: rejected.clone(),
                        },
                    ));
                }
            }
        } else {
            for (up, text) in group.votes {
                said.push((
                    Signal::Thumbs,
                    group.prompt.clone(),
                    Body::Judged {
                        completion: text,
                        good: up,
                    },
                ));
            }
        }
    }
    for group in scores.groups {
        if format == ExportFormat::Dpo {
            let mut high: Option<&(f64, String)> = None;
            let mut low: Option<&(f64, String)> = None;
            for v in &group.votes {
                if high.is_none_or(|h| v.0 > h.0) {
                    high = Some(v);
                }
                if low.is_none_or(|l| v.0 < l.0) {
                    low = Some(v);
                }
            }
            match (high, low) {
                (Some(h), Some(l)) if h.0 > l.0 => {
                    skip(reason::SCORE_MIDDLE, group.votes.len() - 2);
                    said.push((
                        Signal::Score,
                        group.prompt.clone(),
                        Body::Pair {
                            chosen: h.1.clone(),
                            rejected: l.1.clone(),
                        },
                    ));
                }
                _ => skip(reason::SCORE_UNMATCHED, group.votes.len()),
            }
        } else {
            for (score, text) in group.votes {
                said.push((
                    Signal::Score,
                    group.prompt.clone(),
                    Body::Judged {
                        completion: text,
                        good: score >= score_threshold,
                    },
                ));
            }
        }
    }

    // Signals → candidate rows of the format.
    let mut candidates: Vec<Candidate> = Vec::new();
    for (signal, prompt, body) in said {
        let mut add = |replies| {
            candidates.push(Candidate {
                signal,
                prompt: prompt.clone(),
                replies,
            });
        };
        match (format, body) {
            (ExportFormat::Dpo, Body::Better { chosen, rejected }) => {
                for r in rejected {
                    add(Replies::Pair {
                        chosen: chosen.clone(),
                        rejected: r,
                    });
                }
            }
            (ExportFormat::Dpo, Body::Pair { chosen, rejected }) => {
                add(Replies::Pair { chosen, rejected });
            }
            (ExportFormat::Kto, Body::Better { chosen, rejected }) => {
                add(Replies::Unpaired {
                    completion: chosen,
                    label: true,
                });
                for r in rejected {
                    add(Replies::Unpaired {
                        completion: r,
                        label: false,
                    });
                }
            }
            (ExportFormat::Kto, Body::Judged { completion, good }) => {
                add(Replies::Unpaired {
                    completion,
                    label: good,
                });
            }
            (ExportFormat::Sft, Body::Better { chosen, .. }) => {
                add(Replies::Single { completion: chosen });
            }
            (ExportFormat::Sft, Body::Judged { completion, good }) => {
                if good {
                    add(Replies::Single { completion });
                } else if signal == Signal::Thumbs {
                    skip(reason::THUMBS_DOWN, 1);
                } else {
                    skip(reason::LOW_SCORE, 1);
                }
            }
            // Pairs are made for DPO only; judged replies never reach DPO.
            (_, Body::Pair { .. }) | (ExportFormat::Dpo, Body::Judged { .. }) => {}
        }
    }

    // Scrub, check, keep the majority kind, drop duplicates.
    let mut cache: HashMap<String, String> = HashMap::new();
    let mut scrub_text = |text: &str, changed: &mut bool| -> String {
        let clean = cache
            .entry(text.to_string())
            .or_insert_with(|| scrub(text))
            .clone();
        *changed |= clean != text;
        clean
    };
    let mut checked: Vec<(Candidate, bool)> = Vec::new();
    for mut c in candidates {
        let mut changed = false;
        c.prompt = match c.prompt {
            Prompt::Text(t) => Prompt::Text(scrub_text(&t, &mut changed)),
            Prompt::Messages(ms) => Prompt::Messages(
                ms.into_iter()
                    .map(|m| scrub_value(m, &mut |t| scrub_text(t, &mut changed)))
                    .collect(),
            ),
        };
        let empty = match &mut c.replies {
            Replies::Pair { chosen, rejected } => {
                *chosen = scrub_text(chosen, &mut changed);
                *rejected = scrub_text(rejected, &mut changed);
                chosen.trim().is_empty() || rejected.trim().is_empty()
            }
            Replies::Unpaired { completion, .. } | Replies::Single { completion } => {
                *completion = scrub_text(completion, &mut changed);
                completion.trim().is_empty()
            }
        };
        let empty_prompt = match &c.prompt {
            Prompt::Text(t) => t.trim().is_empty(),
            Prompt::Messages(ms) => ms.is_empty(),
        };
        if empty || empty_prompt {
            skip(reason::EMPTY, 1);
        } else if matches!(&c.replies, Replies::Pair { chosen, rejected } if chosen == rejected) {
            skip(reason::SAME, 1);
        } else {
            checked.push((c, changed));
        }
    }
    let conversational = checked
        .iter()
        .filter(|(c, _)| c.prompt.is_conversational())
        .count();
    let keep_conversational = conversational * 2 >= checked.len();

    let mut seen: HashSet<String> = HashSet::new();
    let mut rows = Vec::new();
    let mut by_signal: BTreeMap<String, usize> = BTreeMap::new();
    let mut balance: BTreeMap<String, usize> = match format {
        ExportFormat::Dpo => [("pairs".to_string(), 0)].into(),
        ExportFormat::Kto => [("desirable".to_string(), 0), ("undesirable".to_string(), 0)].into(),
        ExportFormat::Sft => [("examples".to_string(), 0)].into(),
    };
    let mut rescrubbed = 0;
    for (c, changed) in checked {
        if c.prompt.is_conversational() != keep_conversational {
            skip(reason::OTHER_KIND, 1);
            continue;
        }
        let row = render(&c);
        // `serde_json` keeps insertion order, and every row is built in one key order: the
        // text is canonical.
        if !seen.insert(row.to_string()) {
            skip(reason::DUPLICATE, 1);
            continue;
        }
        let tally = match &c.replies {
            Replies::Pair { .. } => "pairs",
            Replies::Unpaired { label: true, .. } => "desirable",
            Replies::Unpaired { label: false, .. } => "undesirable",
            Replies::Single { .. } => "examples",
        };
        *balance.entry(tally.to_string()).or_default() += 1;
        *by_signal.entry(c.signal.name().to_string()).or_default() += 1;
        rescrubbed += usize::from(changed);
        rows.push(row);
    }
    let kind = match (rows.is_empty(), keep_conversational) {
        (true, _) => "empty",
        (false, true) => "conversational",
        (false, false) => "standard",
    };
    Built {
        rows,
        kind,
        by_signal,
        balance,
        dropped,
        rescrubbed,
    }
}

/// `value` with every string scrubbed, except the values of `role` and `type` keys.
fn scrub_value(value: Value, scrub: &mut dyn FnMut(&str) -> String) -> Value {
    match value {
        Value::String(s) => Value::String(scrub(&s)),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| scrub_value(v, scrub)).collect())
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if k == "role" || k == "type" {
                        v
                    } else {
                        scrub_value(v, scrub)
                    };
                    (k, v)
                })
                .collect(),
        ),
        other => other,
    }
}

/// The row in TRL's format: message lists for a conversational prompt, strings otherwise.
fn render(c: &Candidate) -> Value {
    let (prompt, conversational) = match &c.prompt {
        Prompt::Text(t) => (Value::String(t.clone()), false),
        Prompt::Messages(ms) => (Value::Array(ms.clone()), true),
    };
    let reply = |text: &str| {
        if conversational {
            json!([{"role": "assistant", "content": text}])
        } else {
            Value::String(text.to_string())
        }
    };
    match &c.replies {
        Replies::Pair { chosen, rejected } => {
            json!({"prompt": prompt, "chosen": reply(chosen), "rejected": reply(rejected)})
        }
        Replies::Unpaired { completion, label } => {
            json!({"prompt": prompt, "completion": reply(completion), "label": label})
        }
        Replies::Single { completion } => {
            json!({"prompt": prompt, "completion": reply(completion)})
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_immutable_system_prompt_is_put_back_once() {
        let mut chat = serde_json::json!({"prompt": [{"role": "user", "content": "hi"}]});
        super::restore_system_prompt(&mut chat, "Be kind.");
        super::restore_system_prompt(&mut chat, "Be kind.");
        assert_eq!(
            chat["prompt"],
            serde_json::json!([{"role": "system", "content": "Be kind."},
                               {"role": "user", "content": "hi"}])
        );
        let mut text = serde_json::json!({"prompt": "hi"});
        super::restore_system_prompt(&mut text, "Be kind.");
        assert_eq!(text["prompt"], "hi", "text prompts have no system message");
    }

    use kiln_monitor::feedback::{Feedback, SOURCE_API, SOURCE_LABEL};

    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn chat(user: &str) -> String {
        json!([{"role": "user", "content": user}]).to_string()
    }

    fn content(id: &str, prompt: &str, replies: &[&str]) -> ContentRecord {
        ContentRecord {
            request_id: id.into(),
            at: at(0),
            tenant: "acme".into(),
            model: "m".into(),
            no_train: false,
            prompt: prompt.into(),
            completion: replies.first().map(|r| r.to_string()),
            completion_id: None,
            choices: if replies.len() > 1 {
                replies.iter().map(|r| r.to_string()).collect()
            } else {
                Vec::new()
            },
        }
    }

    fn feedback(id: &str, key: &str, t: u64) -> Feedback {
        Feedback {
            feedback_id: Feedback::new_id(),
            at: at(t),
            request_id: id.into(),
            completion_id: None,
            tenant: "acme".into(),
            key_id: key.into(),
            source: SOURCE_API.into(),
            thumbs: None,
            score: None,
            correction: None,
            preferred_index: None,
            compared_with: None,
            no_train: false,
        }
    }

    fn item(f: Feedback, c: Option<ContentRecord>) -> FeedbackItem {
        FeedbackItem {
            feedback: f,
            content: c,
            other: None,
        }
    }

    fn build(items: &[FeedbackItem], format: ExportFormat) -> Built {
        build_rows(items, format, 0.5, &|t: &str| t.replace("secret", "<X>"))
    }

    fn n(m: &BTreeMap<String, usize>, k: &str) -> usize {
        m.get(k).copied().unwrap_or(0)
    }

    #[test]
    fn a_correction_is_chosen_over_the_reply_it_corrects() {
        let c = content("r1", &chat("2+2?"), &["5", "4 maybe"]);
        let mut f = feedback("r1", "k", 1);
        f.correction = Some("4".into());
        f.preferred_index = Some(1);
        let items = [item(f, Some(c))];
        let dpo = build(&items, ExportFormat::Dpo);
        assert_eq!(
            dpo.rows,
            [json!({
                "prompt": [{"role": "user", "content": "2+2?"}],
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "4 maybe"}],
            })]
        );
        assert_eq!(
            (dpo.kind, n(&dpo.by_signal, "correction")),
            ("conversational", 1)
        );
        let kto = build(&items, ExportFormat::Kto);
        let labels: Vec<(&str, bool)> = kto
            .rows
            .iter()
            .map(|r| {
                (
                    r["completion"][0]["content"].as_str().unwrap(),
                    r["label"] == true,
                )
            })
            .collect();
        assert_eq!(labels, [("4", true), ("4 maybe", false)]);
        let sft = build(&items, ExportFormat::Sft);
        assert_eq!(sft.rows[0]["completion"][0]["content"], "4");
        assert_eq!(n(&sft.balance, "examples"), 1);
    }

    #[test]
    fn a_preferred_choice_is_paired_with_every_other_choice() {
        let c = content("r1", "Once upon", &["a time", "a mattress", "a hill"]);
        let mut f = feedback("r1", "k", 1);
        f.preferred_index = Some(0);
        let items = [item(f.clone(), Some(c.clone()))];
        let dpo = build(&items, ExportFormat::Dpo);
        assert_eq!(dpo.kind, "standard");
        assert_eq!(
            dpo.rows,
            [
                json!({"prompt": "Once upon", "chosen": "a time", "rejected": "a mattress"}),
                json!({"prompt": "Once upon", "chosen": "a time", "rejected": "a hill"}),
            ]
        );
        let kto = build(&items, ExportFormat::Kto);
        assert_eq!(
            (n(&kto.balance, "desirable"), n(&kto.balance, "undesirable")),
            (1, 2)
        );
        // One reply only, or an index past the choices: nothing to prefer.
        f.preferred_index = Some(5);
        let single = content("r2", "Once upon", &["a time"]);
        let mut g = feedback("r2", "k", 2);
        g.preferred_index = Some(0);
        let b = build(
            &[item(f, Some(c)), item(g, Some(single))],
            ExportFormat::Dpo,
        );
        assert!(b.rows.is_empty());
        assert_eq!(b.kind, "empty");
        assert_eq!(n(&b.dropped, reason::INDEX_OUT_OF_RANGE), 1);
        assert_eq!(n(&b.dropped, reason::NOT_ENOUGH_CHOICES), 1);
    }

    #[test]
    fn a_comparison_prefers_this_request_over_the_other() {
        let (a, b) = (
            content("a", &chat("hi"), &["hello!"]),
            content("b", &chat("hi"), &["go away"]),
        );
        let mut f = feedback("a", "dashboard", 1);
        f.source = SOURCE_LABEL.into();
        f.compared_with = Some("b".into());
        let mut it = item(f.clone(), Some(a.clone()));
        it.other = Some(b);
        let dpo = build(std::slice::from_ref(&it), ExportFormat::Dpo);
        assert_eq!(dpo.rows[0]["chosen"][0]["content"], "hello!");
        assert_eq!(dpo.rows[0]["rejected"][0]["content"], "go away");
        assert_eq!(n(&dpo.by_signal, "compared_with"), 1);
        // The other request's content is gone, or it answered another prompt.
        let lost = build(&[item(f.clone(), Some(a.clone()))], ExportFormat::Kto);
        assert_eq!(n(&lost.dropped, reason::NO_OTHER), 1);
        it.other = Some(content("b", &chat("bye"), &["go away"]));
        let other = build(&[it], ExportFormat::Sft);
        assert_eq!(n(&other.dropped, reason::OTHER_PROMPT), 1);
    }

    #[test]
    fn thumbs_pair_up_with_down_on_one_prompt_and_the_latest_vote_wins() {
        let p = chat("capital of France?");
        let items = [
            item(
                Feedback {
                    thumbs: Some(Thumbs::Down),
                    ..feedback("r1", "k1", 1)
                },
                Some(content("r1", &p, &["Paris"])),
            ),
            // The same key changes its mind on r1: up wins.
            item(
                Feedback {
                    thumbs: Some(Thumbs::Up),
                    ..feedback("r1", "k1", 2)
                },
                Some(content("r1", &p, &["Paris"])),
            ),
            item(
                Feedback {
                    thumbs: Some(Thumbs::Down),
                    ..feedback("r2", "k2", 3)
                },
                Some(content("r2", &p, &["Lyon"])),
            ),
            // A lone vote on another prompt.
            item(
                Feedback {
                    thumbs: Some(Thumbs::Up),
                    ..feedback("r3", "k1", 4)
                },
                Some(content("r3", &chat("capital of Spain?"), &["Madrid"])),
            ),
        ];
        let dpo = build(&items, ExportFormat::Dpo);
        assert_eq!(dpo.rows.len(), 1);
        assert_eq!(dpo.rows[0]["chosen"][0]["content"], "Paris");
        assert_eq!(dpo.rows[0]["rejected"][0]["content"], "Lyon");
        assert_eq!(n(&dpo.dropped, reason::THUMBS_SUPERSEDED), 1);
        assert_eq!(n(&dpo.dropped, reason::THUMBS_UNMATCHED), 1);
        let kto = build(&items, ExportFormat::Kto);
        assert_eq!(
            (n(&kto.balance, "desirable"), n(&kto.balance, "undesirable")),
            (2, 1)
        );
        let sft = build(&items, ExportFormat::Sft);
        assert_eq!(sft.rows.len(), 2);
        assert_eq!(n(&sft.dropped, reason::THUMBS_DOWN), 1);
    }

    #[test]
    fn scores_split_at_the_threshold_and_pair_highest_with_lowest() {
        let p = "Translate: chat";
        let scored = |id: &str, s: f64, reply: &str| {
            item(
                Feedback {
                    score: Some(s),
                    ..feedback(id, id, 1)
                },
                Some(content(id, p, &[reply])),
            )
        };
        let items = [
            scored("a", 0.9, "cat"),
            scored("b", 0.5, "chat"),
            scored("c", 0.1, "dog"),
        ];
        let dpo = build(&items, ExportFormat::Dpo);
        assert_eq!(
            dpo.rows,
            [json!({"prompt": p, "chosen": "cat", "rejected": "dog"})]
        );
        assert_eq!(n(&dpo.dropped, reason::SCORE_MIDDLE), 1);
        let kto = build(&items, ExportFormat::Kto);
        let labels: Vec<bool> = kto.rows.iter().map(|r| r["label"] == true).collect();
        assert_eq!(labels, [true, true, false], "0.5 is at the threshold");
        let sft = build(&items, ExportFormat::Sft);
        assert_eq!(sft.rows.len(), 2);
        assert_eq!(n(&sft.dropped, reason::LOW_SCORE), 1);
        let tie = build(
            &[scored("a", 0.7, "x"), scored("b", 0.7, "y")],
            ExportFormat::Dpo,
        );
        assert_eq!(n(&tie.dropped, reason::SCORE_UNMATCHED), 2);
    }

    #[test]
    fn rows_are_scrubbed_checked_deduplicated_and_of_one_kind() {
        let mut items = Vec::new();
        for (i, prompt) in [chat("a"), chat("b"), "plain text".to_string()]
            .iter()
            .enumerate()
        {
            let id = format!("r{i}");
            let mut f = feedback(&id, "k", i as u64);
            f.correction = Some("my secret answer".into());
            items.push(item(f, Some(content(&id, prompt, &["x"]))));
        }
        // The same correction on the same prompt twice: one row.
        let mut dup = feedback("r0", "k2", 9);
        dup.correction = Some("my secret answer".into());
        items.push(item(dup, Some(content("r0", &chat("a"), &["x"]))));
        // Empty and identical texts, and no content at all.
        let mut empty = feedback("r5", "k", 10);
        empty.correction = Some("  ".into());
        items.push(item(empty, Some(content("r5", &chat("c"), &["x"]))));
        let mut same = feedback("r6", "k", 11);
        same.correction = Some("x".into());
        items.push(item(same, Some(content("r6", &chat("d"), &["x"]))));
        let mut gone = feedback("r7", "k", 12);
        gone.thumbs = Some(Thumbs::Up);
        items.push(item(gone, None));
        items.push(item(
            feedback("r8", "k", 13),
            Some(content("r8", &chat("e"), &["x"])),
        ));

        let b = build(&items, ExportFormat::Dpo);
        assert_eq!(b.kind, "conversational");
        assert_eq!(b.rows.len(), 2);
        assert_eq!(b.rescrubbed, 2);
        assert!(
            b.rows
                .iter()
                .all(|r| r["chosen"][0]["content"] == "my <X> answer")
        );
        for (why, count) in [
            (reason::OTHER_KIND, 1),
            (reason::DUPLICATE, 1),
            (reason::EMPTY, 1),
            (reason::SAME, 1),
            (reason::NO_CONTENT, 1),
            (reason::NO_SIGNAL, 1),
        ] {
            assert_eq!(n(&b.dropped, why), count, "{why}: {:?}", b.dropped);
        }
        // Prompts are scrubbed too, message fields but the role included.
        let mut f = feedback("p", "k", 1);
        f.correction = Some("ok".into());
        let c = content(
            "p",
            &json!([{"role": "user", "content": "my secret", "name": "secret"}]).to_string(),
            &["no"],
        );
        let b = build(&[item(f, Some(c))], ExportFormat::Sft);
        assert_eq!(
            b.rows[0]["prompt"],
            json!([{"role": "user", "content": "my <X>", "name": "<X>"}])
        );
        assert_eq!(b.rescrubbed, 1);
    }

    #[test]
    fn since_reads_durations_dates_and_rfc3339() {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        let now = secs(SystemTime::now());
        for (spec, ago) in [
            ("30m", 1800.0),
            ("24h", 86_400.0),
            ("7d", 604_800.0),
            ("1.5h", 5400.0),
        ] {
            let t = secs(parse_since(spec).unwrap());
            assert!((now - ago - t).abs() < 5.0, "{spec}");
        }
        assert_eq!(secs(parse_since("2024-03-01").unwrap()), 1_709_251_200.0);
        assert_eq!(
            secs(parse_since("2024-03-01T12:00:00Z").unwrap()),
            1_709_294_400.0
        );
        assert_eq!(
            secs(parse_since("2024-03-01T14:00:00+02:00").unwrap()),
            1_709_294_400.0
        );
        assert_eq!(
            secs(parse_since("2024-03-01t11:30:00.25-00:30").unwrap()),
            1_709_294_400.25
        );
        for bad in [
            "",
            "yesterday",
            "7",
            "d",
            "-3d",
            "1e3h",
            "2024-02-30",
            "2024-13-01",
            "2024-03-01T25:00:00Z",
            "2024-03-01T12:00:00",
            "2024-03-01T12:00:00+0200",
            "1969-12-31",
            "nanh",
        ] {
            assert!(parse_since(bad).is_err(), "{bad:?} parsed");
        }
        let e = parse_since("yesterday").unwrap_err().to_string();
        assert!(e.contains("`yesterday`") && e.contains("24h"), "{e}");
    }

    #[test]
    fn the_summary_says_what_was_written_and_left_out() {
        let s = ExportSummary {
            format: ExportFormat::Kto,
            out: PathBuf::from("out/kto.jsonl"),
            feedback: 9,
            rows: 7,
            sha256: "ab".repeat(32),
            by_signal: [("thumbs".to_string(), 7)].into(),
            balance: [("desirable".to_string(), 4), ("undesirable".to_string(), 3)].into(),
            dropped: [(reason::DUPLICATE.to_string(), 2)].into(),
            excluded_no_train: 1,
            rescrubbed: 2,
            kind: "standard".into(),
        };
        let t = summary_text(&s);
        for part in [
            "4 desirable / 3 undesirable",
            "2 duplicate",
            "excluded: 1",
            "re-scrub: 2",
            "out/kto.jsonl",
        ] {
            assert!(t.contains(part), "{part}: {t}");
        }
        let empty = summary_text(&ExportSummary { rows: 0, ..s });
        assert!(empty.contains("empty file"), "{empty}");
    }
}
