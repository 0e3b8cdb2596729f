//! The request store and the per-tenant budgets built on it.
//!
//! The store itself — one trace per request in SQLite or PostgreSQL, written off the request
//! path — is `kiln-monitor`'s ([`kiln_monitor::store`], re-exported here); budgets are the
//! gateway's: they read a tenant's spend for the current period from the store once, then add
//! each finished request's cost in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub use kiln_monitor::store::*;

use crate::config::Budget;
use crate::cost::period_start;

/// How long a tenant's budget goes unchecked after the store failed to load its spend, before
/// the next request tries again.
const LOAD_RETRY: Duration = Duration::from_secs(10);

/// The longest a request waits for its tenant's spend to load before it is let through.
const LOAD_TIMEOUT: Duration = Duration::from_secs(3);

/// Per-tenant spending caps.
///
/// Each tenant's spend for the current period is loaded from the store the first time the tenant
/// is checked in that period, then kept in memory and increased by [`Budgets::add`] as requests
/// finish, so [`Budgets::check`] costs a mutex and no query. A new period (the next UTC day or
/// month) reloads from the store. With several replicas, each replica counts its own requests on
/// top of what the store held at its load: a cap is exact per replica and approximate across
/// them until the next period's reload.
///
/// If the store cannot be read the budget is not enforced (logged once per incident) and loading
/// is retried after a few seconds: a store outage never refuses paying traffic.
#[derive(Clone)]
pub struct Budgets {
    inner: Arc<BudgetsInner>,
}

struct BudgetsInner {
    store: Store,
    /// Every budgeted tenant, fixed at construction: lookups need no lock on the map.
    tenants: HashMap<String, Slot>,
}

struct Slot {
    budget: Budget,
    spend: Mutex<Spend>,
    /// Held while the spend is loaded, so that a burst of first requests makes one query.
    loading: tokio::sync::Mutex<()>,
}

#[derive(Clone, Copy)]
enum Spend {
    Unknown,
    Loaded {
        period: SystemTime,
        spent: f64,
    },
    Failed {
        period: SystemTime,
        retry_at: Instant,
    },
}

enum Fast {
    Verdict(Result<(), (f64, f64)>),
    Load { failing: bool },
}

impl Budgets {
    pub fn new(cfg: &std::collections::BTreeMap<String, Budget>, store: Store) -> Self {
        let tenants = cfg
            .iter()
            .map(|(tenant, budget)| {
                let slot = Slot {
                    budget: *budget,
                    spend: Mutex::new(Spend::Unknown),
                    loading: tokio::sync::Mutex::new(()),
                };
                (tenant.clone(), slot)
            })
            .collect();
        Self {
            inner: Arc::new(BudgetsInner { store, tenants }),
        }
    }

    /// `Err((spent, budget))` when `tenant` has spent its whole budget for the current period;
    /// `Ok` for a tenant without a budget.
    pub async fn check(&self, tenant: &str) -> Result<(), (f64, f64)> {
        let Some(slot) = self.inner.tenants.get(tenant) else {
            return Ok(());
        };
        let period = period_start(slot.budget.period, SystemTime::now());
        if let Fast::Verdict(v) = slot.fast(period) {
            return v;
        }
        let _loading = slot.loading.lock().await;
        // Another request may have loaded it while this one waited.
        let failing = match slot.fast(period) {
            Fast::Verdict(v) => return v,
            Fast::Load { failing } => failing,
        };
        let loaded =
            tokio::time::timeout(LOAD_TIMEOUT, self.inner.store.spend_since(tenant, period)).await;
        let spent = match loaded {
            Ok(Ok(spent)) => spent,
            Ok(Err(e)) => return slot.failed(tenant, period, failing, &format!("{e:#}")),
            Err(_) => {
                let why = format!("the store did not answer in {LOAD_TIMEOUT:?}");
                return slot.failed(tenant, period, failing, &why);
            }
        };
        if failing {
            eprintln!("kiln gateway: budget of tenant `{tenant}` is enforced again");
        }
        // Requests that finished while the query ran are in the store, or will be: start from
        // the store's figure.
        *slot.lock() = Spend::Loaded { period, spent };
        slot.verdict(spent)
    }

    /// Adds a finished request's cost to `tenant`'s spend in the current period.
    pub async fn add(&self, tenant: &str, cost_usd: f64) {
        let Some(slot) = self.inner.tenants.get(tenant) else {
            return;
        };
        if !(cost_usd.is_finite() && cost_usd > 0.0) {
            return;
        }
        let period = period_start(slot.budget.period, SystemTime::now());
        // Not loaded for this period: the next load reads this request from the store.
        if let Spend::Loaded { period: p, spent } = &mut *slot.lock()
            && *p == period
        {
            *spent += cost_usd;
        }
    }
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Spend> {
        // The guarded value is plain data, always consistent: a panic elsewhere cannot poison it
        // in a way that matters.
        self.spend.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fast(&self, period: SystemTime) -> Fast {
        match *self.lock() {
            Spend::Loaded { period: p, spent } if p == period => Fast::Verdict(self.verdict(spent)),
            Spend::Failed {
                period: p,
                retry_at,
            } if p == period && Instant::now() < retry_at => Fast::Verdict(Ok(())),
            Spend::Failed { .. } => Fast::Load { failing: true },
            _ => Fast::Load { failing: false },
        }
    }

    fn verdict(&self, spent: f64) -> Result<(), (f64, f64)> {
        if spent >= self.budget.budget_usd {
            Err((spent, self.budget.budget_usd))
        } else {
            Ok(())
        }
    }

    fn failed(
        &self,
        tenant: &str,
        period: SystemTime,
        already_failing: bool,
        why: &str,
    ) -> Result<(), (f64, f64)> {
        if !already_failing {
            eprintln!(
                "kiln gateway: budget of tenant `{tenant}` not enforced until the store answers \
                 (retrying every {}s): {why}",
                LOAD_RETRY.as_secs()
            );
        }
        *self.lock() = Spend::Failed {
            period,
            retry_at: Instant::now() + LOAD_RETRY,
        };
        Ok(())
    }
}
