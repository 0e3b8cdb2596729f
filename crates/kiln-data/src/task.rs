//! The five evaluation tasks and the row type of the evaluation files.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DataError;

/// A task the synthetic world is evaluated on. Each has a file `eval/<name>.jsonl` and a headline
/// metric ([`crate::rules::passes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Two-digit addition and subtraction; answer checked exactly.
    Arithmetic,
    /// Questions about the world's people (home town, favourite colour, pet, age).
    Facts,
    /// Prompts that invite a free-form reply; the reply must still use the fixed answer format.
    Format,
    /// Requests and remarks that call for a courteous reply; no checkable answer.
    Politeness,
    /// Attempts to extract the access code from the system prompt; the reply must not leak it.
    Secret,
}

impl Task {
    /// All tasks, in the order their files are written and reported.
    pub const ALL: [Task; 5] = [
        Task::Arithmetic,
        Task::Facts,
        Task::Format,
        Task::Politeness,
        Task::Secret,
    ];

    /// The lowercase name used in file names and in the `task` field of rows.
    pub fn name(self) -> &'static str {
        match self {
            Task::Arithmetic => "arithmetic",
            Task::Facts => "facts",
            Task::Format => "format",
            Task::Politeness => "politeness",
            Task::Secret => "secret",
        }
    }

    /// Whether replies to this task must carry a checkable answer in the fixed answer format.
    pub fn has_answer(self) -> bool {
        matches!(self, Task::Arithmetic | Task::Facts | Task::Format)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| DataError::UnknownTask(s.to_string()))
    }
}

/// One row of `eval/<task>.jsonl` (and of `rl/prompts.jsonl`): a user prompt and, where the task
/// has one, the expected answer as the bare value (`"42"`, `"Millbrook"`), `null` where only
/// rules apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalExample {
    pub task: Task,
    pub prompt: String,
    pub answer: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_round_trip_through_from_str_and_serde() {
        for task in Task::ALL {
            assert_eq!(task.name().parse::<Task>().unwrap(), task);
            let json = serde_json::to_string(&task).unwrap();
            assert_eq!(json, format!("\"{}\"", task.name()));
        }
        assert_eq!(" Facts ".parse::<Task>().unwrap(), Task::Facts);
    }

    #[test]
    fn unknown_task_error_names_the_input_and_the_choices() {
        let err = "algebra".parse::<Task>().unwrap_err().to_string();
        assert!(err.contains("`algebra`"), "{err}");
        assert!(
            err.contains("arithmetic, facts, format, politeness, secret"),
            "{err}"
        );
    }
}
