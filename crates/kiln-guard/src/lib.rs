//! Guardrails for kiln's gateway and data exports.
//!
//! - [`pii`]: detectors for personal data and secrets (e-mail, phone numbers, payment cards
//!   validated with Luhn, IBAN with mod-97, US SSN, IP addresses, cloud keys, private keys,
//!   JWTs, bearer and high-entropy tokens, custom patterns), and [`redact`]: masking, typed
//!   placeholders restorable from a per-request [`redact::Vault`], hashing.
//! - [`injection`]: layered prompt-injection heuristics (instruction override, role-play
//!   jailbreaks, system-prompt extraction, chat-template token injection, encoded payloads and
//!   unicode tricks) and [`canary`]: a token planted in the system prompt whose appearance in a
//!   reply proves a leak.
//! - [`classifier`] and [`train`]: a small transformer sequence classifier (the reward model's
//!   code with `num_labels` outputs) for `benign`, `injection`, `toxic` and `pii_request`, and
//!   [`dataset`]: its labelled data (the synthetic world plus a hand-written adversarial set).
//! - [`layers`]: recall and false positives of the heuristics, the classifier and both, on a
//!   labelled set.
//! - [`policy`]: the `guardrails` section of the gateway's configuration and the checks it
//!   runs on a request's input and on the reply.

pub mod canary;
pub mod classifier;
pub mod dataset;
mod encoding;
pub mod injection;
pub mod layers;
pub mod pii;
pub mod policy;
pub mod redact;
pub mod train;
