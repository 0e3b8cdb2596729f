//! The numbers a run reports, computed as vLLM's `benchmarks/serve.py` computes them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::Endpoint;
use super::prompts::Prompt;
use super::request::RequestMetrics;

/// Where the input token counts came from, best first. A report names the least exact source
/// any of its successful requests needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputTokenSource {
    /// `usage.prompt_tokens` of the response: what the server actually prefilled, chat template
    /// included.
    Usage,
    /// The server's `POST /tokenize` count of the prompt text.
    Tokenize,
    /// A guess from the word count.
    Estimate,
}

/// Mean, median and 99th percentile of a set of samples, in milliseconds. An empty set is all
/// zeros, as vLLM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

impl Summary {
    fn of_ms(samples: impl IntoIterator<Item = Duration>) -> Self {
        let mut ms: Vec<f64> = samples.into_iter().map(|d| d.as_secs_f64() * 1e3).collect();
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        Self {
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            p50: percentile(&ms, 50.0),
            p99: percentile(&ms, 99.0),
        }
    }
}

/// The `p`-th percentile (0–100) of ascending `sorted` samples, interpolating linearly between
/// the two nearest ranks: `numpy.percentile`'s default, which vLLM uses. 0 for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted {
        [] => 0.0,
        [only] => *only,
        _ => {
            let rank = p.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// What was measured, against what: printed with every report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSetup {
    pub url: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub concurrency: usize,
    pub requests: usize,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub seed: u64,
}

/// A benchmark's results. Token totals and latency figures cover successful requests only.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub setup: BenchSetup,
    pub successful_requests: usize,
    pub failed_requests: usize,
    /// Failed requests by reason: `HTTP 429`, `transport`, `stream`, ….
    pub failures: BTreeMap<String, usize>,
    /// The first few distinct failure messages.
    pub errors: Vec<String>,
    /// From the first request sent to the last one finished.
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub input_tokens_source: InputTokenSource,
    pub total_output_tokens: usize,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Generated tokens per second.
    pub output_token_throughput: f64,
    /// Input and generated tokens per second.
    pub total_token_throughput: f64,
    /// Most requests in flight at once, as the client saw them.
    pub peak_concurrent_requests: usize,
    /// Time to first token: sending the request to the first chunk with generated text.
    pub ttft_ms: Summary,
    /// Time per output token after the first, per request: `(e2el − ttft) / (tokens − 1)`.
    pub tpot_ms: Summary,
    /// Inter-token latency: gaps between consecutive chunks with text, pooled over requests.
    pub itl_ms: Summary,
    /// End-to-end latency: sending the request to `data: [DONE]`.
    pub e2el_ms: Summary,
}

pub(super) fn summarise(
    setup: BenchSetup,
    done: &[(Prompt, RequestMetrics)],
    failures: BTreeMap<String, usize>,
    errors: Vec<String>,
    duration: Duration,
    peak_concurrent_requests: usize,
    prompt_source: InputTokenSource,
) -> BenchReport {
    let mut total_input_tokens = 0;
    let mut input_tokens_source = if done.is_empty() {
        prompt_source
    } else {
        InputTokenSource::Usage
    };
    for (prompt, m) in done {
        let (tokens, source) = match m.prompt_tokens {
            Some(n) => (n, InputTokenSource::Usage),
            None => (prompt.tokens, prompt.source),
        };
        total_input_tokens += tokens;
        input_tokens_source = input_tokens_source.max(source);
    }
    let total_output_tokens: usize = done.iter().map(|(_, m)| m.output_tokens).sum();
    let tpots = done
        .iter()
        .filter(|(_, m)| m.output_tokens > 1)
        .map(|(_, m)| m.latency.saturating_sub(m.ttft) / (m.output_tokens as u32 - 1).max(1));
    let secs = duration.as_secs_f64();
    let per_sec = |n: usize| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    BenchReport {
        setup,
        successful_requests: done.len(),
        failed_requests: failures.values().sum(),
        failures,
        errors,
        duration_s: secs,
        total_input_tokens,
        input_tokens_source,
        total_output_tokens,
        request_throughput: per_sec(done.len()),
        output_token_throughput: per_sec(total_output_tokens),
        total_token_throughput: per_sec(total_input_tokens + total_output_tokens),
        peak_concurrent_requests,
        ttft_ms: Summary::of_ms(done.iter().map(|(_, m)| m.ttft)),
        tpot_ms: Summary::of_ms(tpots),
        itl_ms: Summary::of_ms(done.iter().flat_map(|(_, m)| m.itls.iter().copied())),
        e2el_ms: Summary::of_ms(done.iter().map(|(_, m)| m.latency)),
    }
}

/// `label` padded to vLLM's 40 columns, then the value.
fn row(f: &mut fmt::Formatter<'_>, label: &str, value: impl fmt::Display) -> fmt::Result {
    writeln!(f, "{label:<40} {value:<10}")
}

fn heading(f: &mut fmt::Formatter<'_>, title: &str, fill: char) -> fmt::Result {
    let title = format!(" {title} ");
    let pad = 50usize.saturating_sub(title.chars().count());
    let left: String = std::iter::repeat_n(fill, pad / 2).collect();
    let right: String = std::iter::repeat_n(fill, pad - pad / 2).collect();
    writeln!(f, "{left}{title}{right}")
}

fn summary_rows(f: &mut fmt::Formatter<'_>, title: &str, name: &str, s: &Summary) -> fmt::Result {
    heading(f, title, '-')?;
    row(f, &format!("Mean {name} (ms):"), format!("{:.2}", s.mean))?;
    row(f, &format!("Median {name} (ms):"), format!("{:.2}", s.p50))?;
    row(f, &format!("P99 {name} (ms):"), format!("{:.2}", s.p99))
}

/// vLLM's result block, after the setup and before any failures.
impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.setup;
        heading(f, "Serving Benchmark Result", '=')?;
        row(f, "Model:", &s.model)?;
        row(f, "Endpoint:", format!("{}{}", s.url, s.endpoint.path()))?;
        row(f, "Concurrency:", s.concurrency)?;
        row(
            f,
            "Prompt / max tokens:",
            format!("{} / {} (seed {})", s.prompt_len, s.max_tokens, s.seed),
        )?;
        row(f, "Successful requests:", self.successful_requests)?;
        row(f, "Failed requests:", self.failed_requests)?;
        row(
            f,
            "Benchmark duration (s):",
            format!("{:.2}", self.duration_s),
        )?;
        let source = match self.input_tokens_source {
            InputTokenSource::Usage => "",
            InputTokenSource::Tokenize => " (by /tokenize)",
            InputTokenSource::Estimate => " (estimated)",
        };
        row(
            f,
            "Total input tokens:",
            format!("{}{source}", self.total_input_tokens),
        )?;
        row(f, "Total generated tokens:", self.total_output_tokens)?;
        row(
            f,
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput),
        )?;
        row(
            f,
            "Output token throughput (tok/s):",
            format!("{:.2}", self.output_token_throughput),
        )?;
        row(
            f,
            "Total token throughput (tok/s):",
            format!("{:.2}", self.total_token_throughput),
        )?;
        row(
            f,
            "Peak concurrent requests:",
            self.peak_concurrent_requests,
        )?;
        summary_rows(f, "Time to First Token", "TTFT", &self.ttft_ms)?;
        summary_rows(
            f,
            "Time per Output Token (excl. 1st token)",
            "TPOT",
            &self.tpot_ms,
        )?;
        summary_rows(f, "Inter-token Latency", "ITL", &self.itl_ms)?;
        summary_rows(f, "End-to-end Latency", "E2EL", &self.e2el_ms)?;
        if self.failed_requests > 0 {
            heading(f, "Failures", '-')?;
            for (reason, n) in &self.failures {
                row(f, &format!("{reason}:"), n)?;
            }
            for e in &self.errors {
                writeln!(f, "  {e}")?;
            }
        }
        write!(f, "{}", "=".repeat(50))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_like_numpy() {
        // numpy.percentile([1, 2, 3, 4], [50, 99]) == [2.5, 3.97]
        let xs = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&xs, 50.0), 2.5);
        assert!((percentile(&xs, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&xs, 0.0), 1.0);
        assert_eq!(percentile(&xs, 100.0), 4.0);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    fn metrics(ttft: u64, latency: u64, output_tokens: usize) -> RequestMetrics {
        RequestMetrics {
            ttft: Duration::from_millis(ttft),
            itls: vec![Duration::from_millis(10); output_tokens.saturating_sub(1)],
            latency: Duration::from_millis(latency),
            output_tokens,
            prompt_tokens: None,
        }
    }

    fn setup() -> BenchSetup {
        BenchSetup {
            url: "http://127.0.0.1:1".into(),
            model: "m".into(),
            endpoint: Endpoint::Completions,
            concurrency: 2,
            requests: 3,
            prompt_len: 10,
            max_tokens: 5,
            seed: 0,
        }
    }

    #[test]
    fn tpot_skips_single_token_requests_and_input_source_is_the_weakest() {
        let prompt = |source| Prompt {
            text: String::new(),
            tokens: 10,
            source,
        };
        let mut with_usage = metrics(100, 140, 5);
        with_usage.prompt_tokens = Some(12);
        let done = vec![
            (prompt(InputTokenSource::Tokenize), with_usage),
            (prompt(InputTokenSource::Tokenize), metrics(50, 130, 3)),
            (prompt(InputTokenSource::Tokenize), metrics(70, 70, 1)),
        ];
        let r = summarise(
            setup(),
            &done,
            BTreeMap::from([("HTTP 429".to_string(), 2)]),
            vec![],
            Duration::from_secs(2),
            2,
            InputTokenSource::Tokenize,
        );
        assert_eq!(r.successful_requests, 3);
        assert_eq!(r.failed_requests, 2);
        assert_eq!(r.total_input_tokens, 12 + 10 + 10);
        assert_eq!(r.input_tokens_source, InputTokenSource::Tokenize);
        assert_eq!(r.total_output_tokens, 9);
        assert_eq!(r.output_token_throughput, 4.5);
        assert_eq!(r.total_token_throughput, (32.0 + 9.0) / 2.0);
        // (140 - 100) / 4 = 10 and (130 - 50) / 2 = 40; the one-token request has no TPOT.
        assert_eq!(r.tpot_ms.mean, 25.0);
        assert_eq!(r.tpot_ms.p50, 25.0);
        assert_eq!(r.ttft_ms.p50, 70.0);
        let table = r.to_string();
        assert!(
            table.contains("Failed requests:                         2"),
            "{table}"
        );
        assert!(table.contains("HTTP 429:"), "{table}");
    }
}
