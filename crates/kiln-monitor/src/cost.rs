//! Cost per token, two ways: from the configured prices (what a hosted API would charge, the
//! `cost_usd` on each trace) and from the infrastructure — what the serving instances cost per
//! hour divided by the tokens they served per hour, as measured.
//!
//! **The measured rate.** For each model and UTC day, the hours counted are those from the day's
//! first request to the end of its last one (the instance is taken to be paid for while it
//! serves: the night an instance idles through is not charged to the day's tokens, so the
//! figure is the cost of the throughput achieved, not of an always-on instance). Tokens are prompt
//! plus completion tokens of answered requests that reached the model: cache hits and refusals
//! cost the instance nothing and count nothing. The infrastructure cost per token is then
//! `cost_per_hour × hours ÷ tokens`, and each tenant carries its share in proportion to its
//! tokens.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::store::RequestRecord;

/// What the instances serving `model` cost per hour (`"*"`: every model without its own entry).
#[derive(Debug, Clone, PartialEq)]
pub struct InfraPrice {
    pub model: String,
    pub cost_per_hour: f64,
}

impl InfraPrice {
    /// Parses `MODEL=USD_PER_HOUR` (`llama=2.5`, `*=4`).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (model, cost) = spec
            .split_once('=')
            .ok_or_else(|| format!("`{spec}`: expected MODEL=USD_PER_HOUR (llama=2.5)"))?;
        let cost_per_hour: f64 = cost
            .trim()
            .parse()
            .map_err(|_| format!("`{spec}`: `{cost}` is not a number of USD per hour"))?;
        if !(cost_per_hour >= 0.0 && cost_per_hour.is_finite()) {
            return Err(format!("`{spec}`: the cost per hour must be >= 0"));
        }
        Ok(Self {
            model: model.trim().to_string(),
            cost_per_hour,
        })
    }
}

/// The price per hour of `model`'s instances, from its own entry or the `"*"` one.
pub fn infra_price(prices: &[InfraPrice], model: &str) -> Option<f64> {
    prices
        .iter()
        .find(|p| p.model == model)
        .or_else(|| prices.iter().find(|p| p.model == "*"))
        .map(|p| p.cost_per_hour)
}

/// One model's serving on one UTC day.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelDay {
    pub day: String,
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    /// From the first request's arrival to the end of the last one.
    pub hours: f64,
    pub tokens_per_hour: f64,
    pub cost_per_hour: Option<f64>,
    /// `cost_per_hour × hours ÷ tokens × 1000`.
    pub infra_usd_per_1k_tokens: Option<f64>,
}

/// One tenant's use of one model on one UTC day.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CostRow {
    pub day: String,
    pub model: String,
    pub tenant: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// From the configured prices.
    pub price_usd: f64,
    /// The tenant's share of the instances' cost.
    pub infra_usd: Option<f64>,
    pub price_usd_per_1k_tokens: Option<f64>,
    pub infra_usd_per_1k_tokens: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CostReport {
    pub models: Vec<ModelDay>,
    pub rows: Vec<CostRow>,
    /// Over everything: tokens, price cost, infrastructure cost and both per 1,000 tokens.
    pub tokens: u64,
    pub price_usd: f64,
    pub infra_usd: Option<f64>,
    pub price_usd_per_1k_tokens: Option<f64>,
    pub infra_usd_per_1k_tokens: Option<f64>,
}

#[derive(Default)]
struct Span {
    first: Option<SystemTime>,
    last_end: Option<SystemTime>,
    requests: u64,
    tokens: u64,
}

#[derive(Default)]
struct Usage {
    requests: u64,
    prompt: u64,
    completion: u64,
    price: f64,
}

/// Rolls traces up per model, tenant and UTC day.
pub fn rollup(traces: &[RequestRecord], prices: &[InfraPrice]) -> CostReport {
    let mut spans: BTreeMap<(String, String), Span> = BTreeMap::new();
    let mut usage: BTreeMap<(String, String, String), Usage> = BTreeMap::new();
    for t in traces {
        if t.status >= 400 || t.cache_hit {
            continue;
        }
        let day = utc_day(t.at);
        let tokens = t.prompt_tokens + t.completion_tokens;
        let took = t.total_ms.or(t.upstream_ms).unwrap_or(0.0).max(0.0);
        let end = t.at + Duration::from_secs_f64(took / 1e3);
        let s = spans.entry((day.clone(), t.model.clone())).or_default();
        s.first = Some(s.first.map_or(t.at, |f| f.min(t.at)));
        s.last_end = Some(s.last_end.map_or(end, |l| l.max(end)));
        s.requests += 1;
        s.tokens += tokens;
        let u = usage
            .entry((day, t.model.clone(), t.tenant.clone()))
            .or_default();
        u.requests += 1;
        u.prompt += t.prompt_tokens;
        u.completion += t.completion_tokens;
        u.price += t.cost_usd.filter(|c| c.is_finite()).unwrap_or(0.0);
    }
    let per_1k = |usd: f64, tokens: u64| (tokens > 0).then(|| usd / tokens as f64 * 1000.0);
    let mut infra_per_token: BTreeMap<(String, String), f64> = BTreeMap::new();
    let models: Vec<ModelDay> = spans
        .into_iter()
        .map(|((day, model), s)| {
            let hours = match (s.first, s.last_end) {
                (Some(f), Some(l)) => {
                    l.duration_since(f).unwrap_or_default().as_secs_f64() / 3600.0
                }
                _ => 0.0,
            };
            let cost_per_hour = infra_price(prices, &model);
            let infra = cost_per_hour.map(|c| c * hours);
            if let Some(usd) = infra
                && s.tokens > 0
            {
                infra_per_token.insert((day.clone(), model.clone()), usd / s.tokens as f64);
            }
            ModelDay {
                infra_usd_per_1k_tokens: infra.and_then(|usd| per_1k(usd, s.tokens)),
                tokens_per_hour: if hours > 0.0 {
                    s.tokens as f64 / hours
                } else {
                    0.0
                },
                day,
                model,
                requests: s.requests,
                tokens: s.tokens,
                hours,
                cost_per_hour,
            }
        })
        .collect();
    let rows: Vec<CostRow> = usage
        .into_iter()
        .map(|((day, model, tenant), u)| {
            let tokens = u.prompt + u.completion;
            let infra_usd = infra_per_token
                .get(&(day.clone(), model.clone()))
                .map(|per_token| per_token * tokens as f64);
            CostRow {
                price_usd_per_1k_tokens: per_1k(u.price, tokens),
                infra_usd_per_1k_tokens: infra_usd.and_then(|usd| per_1k(usd, tokens)),
                day,
                model,
                tenant,
                requests: u.requests,
                prompt_tokens: u.prompt,
                completion_tokens: u.completion,
                price_usd: u.price,
                infra_usd,
            }
        })
        .collect();
    let tokens: u64 = rows
        .iter()
        .map(|r| r.prompt_tokens + r.completion_tokens)
        .sum();
    let price_usd: f64 = rows.iter().map(|r| r.price_usd).sum();
    let infra: Vec<f64> = rows.iter().filter_map(|r| r.infra_usd).collect();
    let infra_usd = (!infra.is_empty()).then(|| infra.iter().sum::<f64>());
    CostReport {
        price_usd_per_1k_tokens: per_1k(price_usd, tokens),
        infra_usd_per_1k_tokens: infra_usd.and_then(|usd| per_1k(usd, tokens)),
        models,
        rows,
        tokens,
        price_usd,
        infra_usd,
    }
}

/// `YYYY-MM-DD` of `t` in UTC.
pub fn utc_day(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX) - 1,
    };
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD HH:MM:SS` of `t` in UTC, to the second (rounded down).
pub fn utc_time(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX) - 1,
    };
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days from 1970-01-01 to `year`-`month`-`day` (the inverse of [`civil_from_days`], Howard
/// Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month 1–12, day 1–31) of the `days`-th day after 1970-01-01, in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(at_s: u64, model: &str, tenant: &str, tokens: (u64, u64), cost: f64) -> RequestRecord {
        RequestRecord {
            at: UNIX_EPOCH + Duration::from_secs(at_s),
            model: model.into(),
            tenant: tenant.into(),
            status: 200,
            prompt_tokens: tokens.0,
            completion_tokens: tokens.1,
            cost_usd: Some(cost),
            total_ms: Some(1000.0),
            ..RequestRecord::default()
        }
    }

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(utc_day(UNIX_EPOCH), "1970-01-01");
        // 2024-02-29T23:59:59Z and the second after.
        assert_eq!(
            utc_day(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29"
        );
        assert_eq!(
            utc_day(UNIX_EPOCH + Duration::from_secs(1_709_251_200)),
            "2024-03-01"
        );
    }

    #[test]
    fn infra_cost_is_the_hourly_price_over_measured_throughput() {
        // Model `m` serves from t=0 to t=3599+1 s (one hour): 6,000 tokens, 4,000 of them
        // tenant a's. At $3/hour that is $0.0005 per token, $0.50 per 1k.
        let day0 = 86_400 * 20_000;
        let traces = vec![
            trace(day0, "m", "a", (1000, 1000), 0.01),
            trace(day0 + 1800, "m", "a", (1000, 1000), 0.01),
            trace(day0 + 3599, "m", "b", (1000, 1000), 0.01),
            // Not counted: a cache hit and a refusal.
            RequestRecord {
                cache_hit: true,
                ..trace(day0 + 10, "m", "a", (1000, 1000), 0.0)
            },
            RequestRecord {
                status: 429,
                ..trace(day0 + 20, "m", "b", (1000, 0), 0.0)
            },
        ];
        let report = rollup(&traces, &[InfraPrice::parse("*=3").unwrap()]);
        assert_eq!(report.models.len(), 1);
        let m = &report.models[0];
        assert!((m.hours - 1.0).abs() < 1e-9, "{}", m.hours);
        assert_eq!(m.tokens, 6000);
        assert!((m.infra_usd_per_1k_tokens.unwrap() - 0.5).abs() < 1e-9);
        let a = report.rows.iter().find(|r| r.tenant == "a").unwrap();
        assert!((a.infra_usd.unwrap() - 2.0).abs() < 1e-9);
        assert!((a.price_usd - 0.02).abs() < 1e-12);
        assert!((a.price_usd_per_1k_tokens.unwrap() - 0.005).abs() < 1e-12);
        assert!((report.infra_usd.unwrap() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn infra_prices_parse_and_name_mistakes() {
        assert_eq!(
            InfraPrice::parse("llama=2.5").unwrap(),
            InfraPrice {
                model: "llama".into(),
                cost_per_hour: 2.5
            }
        );
        assert!(
            InfraPrice::parse("llama")
                .unwrap_err()
                .contains("MODEL=USD_PER_HOUR")
        );
        assert!(
            InfraPrice::parse("llama=abc")
                .unwrap_err()
                .contains("not a number")
        );
        assert!(InfraPrice::parse("llama=-1").unwrap_err().contains(">= 0"));
        let prices = [
            InfraPrice::parse("a=1").unwrap(),
            InfraPrice::parse("*=2").unwrap(),
        ];
        assert_eq!(infra_price(&prices, "a"), Some(1.0));
        assert_eq!(infra_price(&prices, "b"), Some(2.0));
        assert_eq!(infra_price(&prices[..1], "b"), None);
    }
}
