//! Rolling time series for the live dashboard.
//!
//! The gateway feeds one [`Observation`] per finished request from a background task, so
//! [`Live::observe`] has to be cheap: it touches one preallocated bucket of a ring (fixed-size
//! log-spaced latency histograms, counters, a short per-bucket label list) under a `Mutex` and
//! never sorts. Everything the page draws — percentiles, ratios, costs per 1k tokens, the empty
//! buckets that keep the time axis continuous — is computed in [`Live::snapshot`], which runs
//! only when someone looks at the dashboard.
//!
//! Percentiles come from the histograms: bins are spaced by a ratio of 1.1 from 0.05 ms to
//! 120 s, so an interpolated percentile is within about 10% of the exact one (and is clamped to
//! the smallest and largest value the bucket saw).
//!
//! Tenant and model names come from callers, so they are interned into a table of at most
//! [`MAX_LABELS`] entries; once it is full, new names are counted under [`OTHER_LABEL`]. Names
//! that no longer appear in the window are forgotten when a new bucket starts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One finished request, as the gateway saw it.
#[derive(Debug, Clone)]
pub struct Observation {
    pub at: SystemTime,
    pub tenant: String,
    pub model: String,
    pub status: u16,
    /// The whole request as the client saw it.
    pub total_ms: f64,
    /// The gateway's own time.
    pub gateway_ms: f64,
    /// Time waiting upstream before the first token, when known.
    pub queue_ms: Option<f64>,
    /// Time to first token (streams), when known.
    pub ttft_ms: Option<f64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: Option<f64>,
    pub cache_hit: bool,
    pub cache_lookup: bool,
    /// Refused by a guardrail.
    pub guard_blocked: bool,
    /// `Some(flagged)` when the reply was assessed.
    pub hallucination: Option<bool>,
    /// Confidence-based probability that the answer is wrong.
    pub p_wrong: Option<f64>,
}

/// One drift check: per-feature scores against their thresholds.
#[derive(Debug, Clone, Serialize)]
pub struct DriftPoint {
    pub at_ms: u64,
    pub drift: bool,
    /// Share of features that drifted.
    pub share: f64,
    /// Feature → score.
    pub scores: BTreeMap<String, f64>,
    /// Feature → threshold.
    pub thresholds: BTreeMap<String, f64>,
    pub drifted: Vec<String>,
}

/// At most this many tenants (and, separately, models) are tracked, [`OTHER_LABEL`] included.
pub const MAX_LABELS: usize = 50;
/// The name under which tenants or models beyond [`MAX_LABELS`] are counted.
pub const OTHER_LABEL: &str = "(other)";
/// Drift checks kept.
pub const DRIFT_HISTORY: usize = 500;
/// How far ahead of the local clock a request may be stamped and still count.
pub const FUTURE_SLACK: Duration = Duration::from_secs(60);
/// Longest tenant or model name kept; longer names are cut (on a char boundary).
const MAX_LABEL_LEN: usize = 128;

// Histogram: bin 0 is [0, MIN), bin k in 1..=STEPS is [MIN·R^(k-1), MIN·R^k), bin STEPS+1 is
// everything from MAX up.
const HIST_MIN_MS: f64 = 0.05;
const HIST_MAX_MS: f64 = 120_000.0;
const HIST_RATIO: f64 = 1.1;
// ceil(ln(MAX/MIN) / ln(R)) = ceil(154.3)
const HIST_STEPS: usize = 155;
const HIST_BINS: usize = HIST_STEPS + 2;

#[derive(Clone)]
struct Hist {
    counts: Box<[u32; HIST_BINS]>,
    n: u64,
    min: f64,
    max: f64,
}

impl Hist {
    fn new() -> Self {
        Self {
            counts: Box::new([0; HIST_BINS]),
            n: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn clear(&mut self) {
        self.counts.fill(0);
        self.n = 0;
        self.min = f64::INFINITY;
        self.max = f64::NEG_INFINITY;
    }

    fn bin_of(v: f64) -> usize {
        if v < HIST_MIN_MS {
            0
        } else if v >= HIST_MAX_MS {
            HIST_STEPS + 1
        } else {
            let k = ((v / HIST_MIN_MS).ln() / HIST_RATIO.ln()).floor() as usize + 1;
            k.min(HIST_STEPS)
        }
    }

    /// Lower and upper edge of bin `k` (for bins 1..=STEPS).
    fn edges(k: usize) -> (f64, f64) {
        let lo = HIST_MIN_MS * HIST_RATIO.powi(k as i32 - 1);
        (lo, (lo * HIST_RATIO).min(HIST_MAX_MS))
    }

    fn record(&mut self, v: f64) {
        let v = if v.is_finite() && v > 0.0 { v } else { 0.0 };
        let k = Self::bin_of(v);
        self.counts[k] = self.counts[k].saturating_add(1);
        self.n += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    fn merge(&mut self, other: &Hist) {
        if other.n == 0 {
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.n += other.n;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The `q`-quantile (0..=1), interpolated geometrically inside the bin that holds it;
    /// `None` when empty.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let target = (q.clamp(0.0, 1.0) * self.n as f64).max(f64::MIN_POSITIVE);
        let mut before = 0.0;
        for (k, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let after = before + f64::from(c);
            if after >= target {
                let frac = ((target - before) / f64::from(c)).clamp(0.0, 1.0);
                let v = if k == 0 {
                    HIST_MIN_MS * frac
                } else if k == HIST_STEPS + 1 {
                    self.max
                } else {
                    let (lo, hi) = Self::edges(k);
                    lo * (hi / lo).powf(frac)
                };
                return Some(v.clamp(self.min, self.max));
            }
            before = after;
        }
        Some(self.max)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct LabelCounts {
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
}

impl LabelCounts {
    fn add(&mut self, o: &LabelCounts) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.cost_usd += o.cost_usd;
    }
}

#[derive(Clone)]
struct Bucket {
    /// Bucket number since the epoch; `None` while the slot is unused.
    index: Option<u64>,
    requests: u64,
    errors_5xx: u64,
    errors_4xx: u64,
    guard_blocks: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
    /// Tokens of the requests that came with a cost.
    priced_tokens: u64,
    cache_lookups: u64,
    cache_hits: u64,
    assessed: u64,
    flagged: u64,
    p_wrong_sum: f64,
    p_wrong_n: u64,
    total: Hist,
    gateway: Hist,
    queue: Hist,
    ttft: Hist,
    /// (label id, counts); short, searched linearly, capacity kept across reuse.
    models: Vec<(u16, LabelCounts)>,
    tenants: Vec<(u16, LabelCounts)>,
}

impl Bucket {
    fn new() -> Self {
        Self {
            index: None,
            requests: 0,
            errors_5xx: 0,
            errors_4xx: 0,
            guard_blocks: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            priced_tokens: 0,
            cache_lookups: 0,
            cache_hits: 0,
            assessed: 0,
            flagged: 0,
            p_wrong_sum: 0.0,
            p_wrong_n: 0,
            total: Hist::new(),
            gateway: Hist::new(),
            queue: Hist::new(),
            ttft: Hist::new(),
            models: Vec::new(),
            tenants: Vec::new(),
        }
    }

    fn reset(&mut self, index: u64) {
        self.index = Some(index);
        self.requests = 0;
        self.errors_5xx = 0;
        self.errors_4xx = 0;
        self.guard_blocks = 0;
        self.prompt_tokens = 0;
        self.completion_tokens = 0;
        self.cost_usd = 0.0;
        self.priced_tokens = 0;
        self.cache_lookups = 0;
        self.cache_hits = 0;
        self.assessed = 0;
        self.flagged = 0;
        self.p_wrong_sum = 0.0;
        self.p_wrong_n = 0;
        self.total.clear();
        self.gateway.clear();
        self.queue.clear();
        self.ttft.clear();
        self.models.clear();
        self.tenants.clear();
    }
}

fn add_label(list: &mut Vec<(u16, LabelCounts)>, id: u16, c: &LabelCounts) {
    match list.iter_mut().find(|(i, _)| *i == id) {
        Some((_, counts)) => counts.add(c),
        None => list.push((id, *c)),
    }
}

/// Interned tenant or model names: ids are slots of `names`; the last slot is [`OTHER_LABEL`].
struct Labels {
    ids: HashMap<String, u16>,
    names: Vec<Option<String>>,
}

impl Labels {
    const OTHER: u16 = (MAX_LABELS - 1) as u16;

    fn new() -> Self {
        let mut names = vec![None; MAX_LABELS];
        names[MAX_LABELS - 1] = Some(OTHER_LABEL.to_string());
        Self {
            ids: HashMap::with_capacity(MAX_LABELS),
            names,
        }
    }

    fn intern(&mut self, name: &str) -> u16 {
        let name = truncate(name, MAX_LABEL_LEN);
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        if name == OTHER_LABEL {
            return Self::OTHER;
        }
        match self.names[..MAX_LABELS - 1]
            .iter()
            .position(Option::is_none)
        {
            Some(slot) => {
                self.names[slot] = Some(name.to_string());
                self.ids.insert(name.to_string(), slot as u16);
                slot as u16
            }
            None => Self::OTHER,
        }
    }

    fn name(&self, id: u16) -> &str {
        self.names
            .get(usize::from(id))
            .and_then(|n| n.as_deref())
            .unwrap_or(OTHER_LABEL)
    }

    /// Forgets every name whose id `used` does not mark.
    fn retain(&mut self, used: &[bool; MAX_LABELS]) {
        for (slot, name) in self.names[..MAX_LABELS - 1].iter_mut().enumerate() {
            if !used[slot]
                && let Some(n) = name.take()
            {
                self.ids.remove(&n);
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct State {
    buckets: Vec<Bucket>,
    /// Newest bucket index seen.
    newest: Option<u64>,
    /// Earliest observation ever seen (ms since the epoch): infra cost is charged from here.
    first_ms: Option<u64>,
    models: Labels,
    tenants: Labels,
    drift: VecDeque<DriftPoint>,
    infra_cost_per_hour: Option<f64>,
}

impl State {
    /// Frees the label ids no bucket of the window uses any more.
    fn collect_labels(&mut self, newest: u64, keep: u64) {
        let mut models = [false; MAX_LABELS];
        let mut tenants = [false; MAX_LABELS];
        for b in &self.buckets {
            let live = b.index.is_some_and(|i| i + keep > newest);
            if !live {
                continue;
            }
            for (id, _) in &b.models {
                models[usize::from(*id)] = true;
            }
            for (id, _) in &b.tenants {
                tenants[usize::from(*id)] = true;
            }
        }
        self.models.retain(&models);
        self.tenants.retain(&tenants);
    }
}

/// Rolling per-bucket series over the last `keep` buckets; see the module docs.
pub struct Live {
    bucket_ms: u64,
    keep: usize,
    state: Mutex<State>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("bucket_ms", &self.bucket_ms)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

fn ms_since_epoch(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

fn per_1k(cost: f64, tokens: u64) -> Option<f64> {
    (tokens > 0 && cost.is_finite()).then(|| cost / tokens as f64 * 1000.0)
}

impl Live {
    /// `bucket` wide buckets (at least 1 ms), the last `keep` of them (at least 1) kept: for
    /// example 10 s × 360 for one hour.
    pub fn new(bucket: Duration, keep: usize) -> Self {
        let bucket_ms = u64::try_from(bucket.as_millis()).unwrap_or(u64::MAX).max(1);
        let keep = keep.max(1);
        Self {
            bucket_ms,
            keep,
            state: Mutex::new(State {
                buckets: vec![Bucket::new(); keep],
                newest: None,
                first_ms: None,
                models: Labels::new(),
                tenants: Labels::new(),
                drift: VecDeque::with_capacity(DRIFT_HISTORY),
                infra_cost_per_hour: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters, never broken invariants.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one finished request. Dropped: requests older than the window (relative to the
    /// newest one seen), from before 1970, or more than [`FUTURE_SLACK`] (or one bucket, if
    /// longer) ahead of this machine's clock — one such timestamp would otherwise push the
    /// window ahead and make every later request look too old.
    pub fn observe(&self, o: &Observation) {
        let Some(at_ms) = ms_since_epoch(o.at) else {
            return;
        };
        let slack_ms = self.bucket_ms.max(FUTURE_SLACK.as_millis() as u64);
        if ms_since_epoch(SystemTime::now()).is_some_and(|now| at_ms > now.saturating_add(slack_ms))
        {
            return;
        }
        let index = at_ms / self.bucket_ms;
        let keep = self.keep as u64;
        let mut st = self.lock();
        let st = &mut *st;
        if let Some(newest) = st.newest
            && index + keep <= newest
        {
            return;
        }
        st.first_ms = Some(st.first_ms.map_or(at_ms, |f| f.min(at_ms)));
        let slot = (index % keep) as usize;
        let rotated = st.buckets[slot].index != Some(index);
        if rotated {
            st.buckets[slot].reset(index);
        }
        if st.newest.is_none_or(|n| index > n) {
            st.newest = Some(index);
        }
        if rotated && let Some(newest) = st.newest {
            st.collect_labels(newest, keep);
        }
        let model = st.models.intern(&o.model);
        let tenant = st.tenants.intern(&o.tenant);

        let b = &mut st.buckets[slot];
        b.requests += 1;
        if o.status >= 500 {
            b.errors_5xx += 1;
        } else if o.status >= 400 {
            b.errors_4xx += 1;
        }
        if o.guard_blocked {
            b.guard_blocks += 1;
        }
        b.prompt_tokens += o.prompt_tokens;
        b.completion_tokens += o.completion_tokens;
        let cost = o.cost_usd.filter(|c| c.is_finite()).unwrap_or(0.0);
        if o.cost_usd.is_some_and(f64::is_finite) {
            b.cost_usd += cost;
            b.priced_tokens += o.prompt_tokens + o.completion_tokens;
        }
        if o.cache_lookup || o.cache_hit {
            b.cache_lookups += 1;
            if o.cache_hit {
                b.cache_hits += 1;
            }
        }
        if let Some(flagged) = o.hallucination {
            b.assessed += 1;
            if flagged {
                b.flagged += 1;
            }
        }
        if let Some(p) = o.p_wrong.filter(|p| p.is_finite()) {
            b.p_wrong_sum += p.clamp(0.0, 1.0);
            b.p_wrong_n += 1;
        }
        b.total.record(o.total_ms);
        b.gateway.record(o.gateway_ms);
        if let Some(q) = o.queue_ms {
            b.queue.record(q);
        }
        if let Some(t) = o.ttft_ms {
            b.ttft.record(t);
        }
        let counts = LabelCounts {
            requests: 1,
            prompt_tokens: o.prompt_tokens,
            completion_tokens: o.completion_tokens,
            cost_usd: cost,
        };
        add_label(&mut b.models, model, &counts);
        add_label(&mut b.tenants, tenant, &counts);
    }

    /// Appends a drift check to the history (the oldest beyond [`DRIFT_HISTORY`] go).
    pub fn set_drift(&self, p: DriftPoint) {
        let mut st = self.lock();
        while st.drift.len() >= DRIFT_HISTORY {
            st.drift.pop_front();
        }
        st.drift.push_back(p);
    }

    /// What the serving instances cost per hour, all together; `None` when unknown.
    pub fn set_infra_cost_per_hour(&self, usd: Option<f64>) {
        self.lock().infra_cost_per_hour = usd.filter(|u| u.is_finite() && *u >= 0.0);
    }

    /// The window ending with the bucket that holds `now`, every bucket present.
    pub fn snapshot(&self, now: SystemTime) -> DashboardData {
        let now_ms = ms_since_epoch(now).unwrap_or(0);
        let last = now_ms / self.bucket_ms;
        let keep = self.keep as u64;
        let first = (last + 1).saturating_sub(keep);
        let st = self.lock();

        let mut buckets = Vec::with_capacity(self.keep);
        let mut total = Bucket::new();
        let mut models = [LabelCounts::default(); MAX_LABELS];
        let mut tenants = [LabelCounts::default(); MAX_LABELS];
        let bucket_hours = self.bucket_ms as f64 / 3_600_000.0;
        for index in first..=last {
            let slot = (index % keep) as usize;
            let t_ms = index * self.bucket_ms;
            let b = &st.buckets[slot];
            // A slot older than the window of the newest request may hold label ids that were
            // given to other names since (only when `now` lags the requests' clocks).
            let stale = st.newest.is_some_and(|n| index + keep <= n);
            if b.index != Some(index) || stale {
                buckets.push(BucketData::empty(t_ms));
                continue;
            }
            // The bucket still filling is charged only for the time it has run so far.
            let hours = if index == last {
                now_ms.saturating_sub(t_ms).max(1) as f64 / 3_600_000.0
            } else {
                bucket_hours
            };
            buckets.push(BucketData::from_bucket(
                t_ms,
                b,
                st.infra_cost_per_hour.map(|h| h * hours),
            ));
            accumulate(&mut total, b);
            for (id, c) in &b.models {
                models[usize::from(*id)].add(c);
            }
            for (id, c) in &b.tenants {
                tenants[usize::from(*id)].add(c);
            }
        }

        // Infra cost runs from the start of the window, or from the first request ever seen
        // when that is later (the instances were not ours before), to now.
        let window_start = first * self.bucket_ms;
        let charged_from = st.first_ms.map_or(now_ms, |f| f.max(window_start));
        let charged_hours = now_ms.saturating_sub(charged_from) as f64 / 3_600_000.0;
        let infra_cost_usd = st.infra_cost_per_hour.map(|h| h * charged_hours);
        let tokens = total.prompt_tokens + total.completion_tokens;

        let totals = Totals {
            requests: total.requests,
            errors_5xx: total.errors_5xx,
            errors_4xx: total.errors_4xx,
            guard_blocks: total.guard_blocks,
            prompt_tokens: total.prompt_tokens,
            completion_tokens: total.completion_tokens,
            tokens,
            cost_usd: total.cost_usd,
            cost_per_1k_tokens: per_1k(total.cost_usd, total.priced_tokens),
            infra_cost_usd,
            infra_cost_per_1k_tokens: infra_cost_usd.and_then(|c| per_1k(c, tokens)),
            cache_lookups: total.cache_lookups,
            cache_hit_ratio: ratio(total.cache_hits, total.cache_lookups),
            assessed: total.assessed,
            hallucination_rate: ratio(total.flagged, total.assessed),
            p_wrong_mean: (total.p_wrong_n > 0).then(|| total.p_wrong_sum / total.p_wrong_n as f64),
            latency_p50_ms: total.total.quantile(0.50),
            latency_p95_ms: total.total.quantile(0.95),
            latency_p99_ms: total.total.quantile(0.99),
            gateway_p99_ms: total.gateway.quantile(0.99),
            ttft_p50_ms: total.ttft.quantile(0.50),
            ttft_p95_ms: total.ttft.quantile(0.95),
        };

        DashboardData {
            generated_at_ms: now_ms,
            bucket_s: self.bucket_ms as f64 / 1000.0,
            window_s: (self.bucket_ms * keep) as f64 / 1000.0,
            infra_cost_per_hour: st.infra_cost_per_hour,
            buckets,
            totals,
            models: label_rows(&st.models, &models),
            tenants: label_rows(&st.tenants, &tenants),
            drift: st.drift.iter().cloned().collect(),
            drift_latest: st.drift.back().cloned(),
        }
    }
}

fn accumulate(into: &mut Bucket, b: &Bucket) {
    into.requests += b.requests;
    into.errors_5xx += b.errors_5xx;
    into.errors_4xx += b.errors_4xx;
    into.guard_blocks += b.guard_blocks;
    into.prompt_tokens += b.prompt_tokens;
    into.completion_tokens += b.completion_tokens;
    into.cost_usd += b.cost_usd;
    into.priced_tokens += b.priced_tokens;
    into.cache_lookups += b.cache_lookups;
    into.cache_hits += b.cache_hits;
    into.assessed += b.assessed;
    into.flagged += b.flagged;
    into.p_wrong_sum += b.p_wrong_sum;
    into.p_wrong_n += b.p_wrong_n;
    into.total.merge(&b.total);
    into.gateway.merge(&b.gateway);
    into.queue.merge(&b.queue);
    into.ttft.merge(&b.ttft);
}

fn label_rows(labels: &Labels, counts: &[LabelCounts; MAX_LABELS]) -> Vec<LabelRow> {
    let mut rows: Vec<LabelRow> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| c.requests > 0)
        .map(|(id, c)| LabelRow {
            name: labels.name(id as u16).to_string(),
            requests: c.requests,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            tokens: c.prompt_tokens + c.completion_tokens,
            cost_usd: c.cost_usd,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then_with(|| a.name.cmp(&b.name))
    });
    rows
}

/// What `GET /dashboard/data` returns.
#[derive(Debug, Clone, Serialize)]
pub struct DashboardData {
    pub generated_at_ms: u64,
    pub bucket_s: f64,
    /// Length of the window the buckets cover.
    pub window_s: f64,
    pub infra_cost_per_hour: Option<f64>,
    /// Oldest first, one per bucket of the window, empty ones included.
    pub buckets: Vec<BucketData>,
    pub totals: Totals,
    /// Per model over the window, most requests first; at most [`MAX_LABELS`].
    pub models: Vec<LabelRow>,
    /// Per tenant over the window, most requests first; at most [`MAX_LABELS`].
    pub tenants: Vec<LabelRow>,
    /// Drift checks, oldest first (at most [`DRIFT_HISTORY`]).
    pub drift: Vec<DriftPoint>,
    pub drift_latest: Option<DriftPoint>,
}

/// One time bucket. Ratios and percentiles are `None` (JSON `null`) when nothing was measured.
#[derive(Debug, Clone, Serialize)]
pub struct BucketData {
    /// Start of the bucket, ms since the epoch.
    pub t_ms: u64,
    pub requests: u64,
    /// Status ≥ 500.
    pub errors_5xx: u64,
    /// Status 400..=499.
    pub errors_4xx: u64,
    pub guard_blocks: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub gateway_p99_ms: Option<f64>,
    pub queue_p95_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    /// From prices: cost of the priced requests ÷ their tokens × 1000.
    pub cost_per_1k_tokens: Option<f64>,
    /// Infra cost of this bucket's duration (so far, for the newest; at the current hourly
    /// price) ÷ tokens × 1000.
    pub infra_cost_per_1k_tokens: Option<f64>,
    pub cache_hit_ratio: Option<f64>,
    pub hallucination_rate: Option<f64>,
    pub p_wrong_mean: Option<f64>,
}

impl BucketData {
    fn empty(t_ms: u64) -> Self {
        Self {
            t_ms,
            requests: 0,
            errors_5xx: 0,
            errors_4xx: 0,
            guard_blocks: 0,
            latency_p50_ms: None,
            latency_p95_ms: None,
            latency_p99_ms: None,
            gateway_p99_ms: None,
            queue_p95_ms: None,
            ttft_p50_ms: None,
            ttft_p95_ms: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            cost_per_1k_tokens: None,
            infra_cost_per_1k_tokens: None,
            cache_hit_ratio: None,
            hallucination_rate: None,
            p_wrong_mean: None,
        }
    }

    fn from_bucket(t_ms: u64, b: &Bucket, infra_cost: Option<f64>) -> Self {
        let tokens = b.prompt_tokens + b.completion_tokens;
        Self {
            t_ms,
            requests: b.requests,
            errors_5xx: b.errors_5xx,
            errors_4xx: b.errors_4xx,
            guard_blocks: b.guard_blocks,
            latency_p50_ms: b.total.quantile(0.50),
            latency_p95_ms: b.total.quantile(0.95),
            latency_p99_ms: b.total.quantile(0.99),
            gateway_p99_ms: b.gateway.quantile(0.99),
            queue_p95_ms: b.queue.quantile(0.95),
            ttft_p50_ms: b.ttft.quantile(0.50),
            ttft_p95_ms: b.ttft.quantile(0.95),
            prompt_tokens: b.prompt_tokens,
            completion_tokens: b.completion_tokens,
            cost_usd: b.cost_usd,
            cost_per_1k_tokens: per_1k(b.cost_usd, b.priced_tokens),
            infra_cost_per_1k_tokens: infra_cost.and_then(|c| per_1k(c, tokens)),
            cache_hit_ratio: ratio(b.cache_hits, b.cache_lookups),
            hallucination_rate: ratio(b.flagged, b.assessed),
            p_wrong_mean: (b.p_wrong_n > 0).then(|| b.p_wrong_sum / b.p_wrong_n as f64),
        }
    }
}

/// Sums over the whole window.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub errors_5xx: u64,
    pub errors_4xx: u64,
    pub guard_blocks: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tokens: u64,
    pub cost_usd: f64,
    /// From prices; `None` when no priced request had tokens.
    pub cost_per_1k_tokens: Option<f64>,
    /// Infra cost per hour × hours since the later of the window start and the first request.
    pub infra_cost_usd: Option<f64>,
    /// `infra_cost_usd` ÷ tokens × 1000; `None` without tokens or without an infra price.
    pub infra_cost_per_1k_tokens: Option<f64>,
    pub cache_lookups: u64,
    pub cache_hit_ratio: Option<f64>,
    /// Replies assessed for hallucination.
    pub assessed: u64,
    pub hallucination_rate: Option<f64>,
    pub p_wrong_mean: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub gateway_p99_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
}

/// Totals for one tenant or model.
#[derive(Debug, Clone, Serialize)]
pub struct LabelRow {
    pub name: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tokens: u64,
    pub cost_usd: f64,
}
