//! What a request costs, and where a budget period starts.
//!
//! Prices are USD per million tokens (`pricing.<model>.input_per_million` /
//! `output_per_million`), the way every hosted API quotes them. Budget periods are UTC calendar
//! days and months, computed here from the Unix clock without a date-time crate: a tenant's
//! "month" is the same on every gateway replica whatever its local time zone.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_monitor::cost::{civil_from_days, days_from_civil};

use crate::config::{BudgetPeriod, Pricing};

const SECONDS_PER_DAY: i64 = 86_400;

/// The cost in USD of `prompt_tokens` in and `completion_tokens` out of `model`; `None` when
/// `pricing` has no entry for the model (the request is recorded without a cost and counts
/// nothing against a budget).
pub fn request_cost(
    pricing: &BTreeMap<String, Pricing>,
    model: &str,
    prompt_tokens: u64,
    completion_tokens: u64,
) -> Option<f64> {
    let p = pricing.get(model)?;
    // u64 → f64 rounds above 2^53 tokens, far beyond any request.
    let usd = (prompt_tokens as f64 * p.input_per_million
        + completion_tokens as f64 * p.output_per_million)
        / 1_000_000.0;
    Some(usd)
}

/// The start of the budget period that contains `now`: 00:00 UTC of its day, or 00:00 UTC of the
/// first day of its month.
pub fn period_start(period: BudgetPeriod, now: SystemTime) -> SystemTime {
    let secs = unix_seconds(now);
    let day = secs.div_euclid(SECONDS_PER_DAY);
    let first_day = match period {
        BudgetPeriod::Day => day,
        BudgetPeriod::Month => {
            let (year, month, _) = civil_from_days(day);
            days_from_civil(year, month, 1)
        }
    };
    from_unix_seconds(first_day * SECONDS_PER_DAY)
}

/// Whole seconds since the Unix epoch, negative before it (floored, so a time one nanosecond
/// before the epoch is -1).
fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() > 0 {
                -whole - 1
            } else {
                -whole
            }
        }
    }
}

fn from_unix_seconds(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 2024-02-29, a leap day.
        let leap = days_from_civil(2024, 2, 29);
        assert_eq!(civil_from_days(leap), (2024, 2, 29));
        assert_eq!(civil_from_days(leap + 1), (2024, 3, 1));
        for d in -800_000..800_000 {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn unix_seconds_floors_before_the_epoch() {
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_nanos(1)), -1);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(2)), -2);
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_millis(1500)), 1);
    }
}
