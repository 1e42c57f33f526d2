//! The text side of the `math` task family: problems with a final answer read from a JSONL
//! file, free-text reasoning split into episodes at the paper's markers, and a sample file of
//! arithmetic word problems that the project writes itself. The answer a model gives and
//! whether it is the reference's are in data/answer.rs (re-exported here).
//!
//! Everything here is a pure function of text, so it is tested without a model; the rollout
//! side (prompting a pretrained model, the forced-termination suffix, budget forcing) builds
//! on it.

use std::fs;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use super::answer::{equivalent, last_boxed, normalize, number, Rational};
use crate::error::{Error, Result};

/// One problem: the question as the model is shown it and the reference answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MathProblem {
    #[serde(alias = "problem")]
    pub question: String,
    #[serde(deserialize_with = "string_or_number")]
    pub answer: String,
}

/// Answers may be written as JSON numbers (`42`) or strings (`"\\frac{1}{2}"`).
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string or a number, found {other}"
        ))),
    }
}

/// Reads a JSONL file of problems in any of the layouts of [`super::datasets`] (GSM8K,
/// MATH, MATH-500, SVAMP, ASDiv, MAWPS, plain `question`/`answer`; other fields are ignored;
/// blank lines are skipped). Errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<MathProblem>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |reason: String| Error::Json {
            path: path.to_path_buf(),
            reason: format!("line {}: {reason}", i + 1),
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let object = value.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let (p, _) = super::datasets::parse_line(object).map_err(bad)?;
        problems.push(p);
    }
    if problems.is_empty() {
        return Err(Error::Json {
            path: path.to_path_buf(),
            reason: "no problems (one JSON object per line expected)".into(),
        });
    }
    Ok(problems)
}

/// Writes problems as JSONL, one object per line.
pub fn write_jsonl(problems: &[MathProblem], path: &Path) -> Result<()> {
    let mut text = String::new();
    for p in problems {
        text.push_str(&serde_json::to_string(p).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?);
        text.push('\n');
    }
    crate::fsutil::write_atomic(path, text.as_bytes())
}

/// The prompt for `question`: `template` with `{question}` replaced.
pub fn render_prompt(template: &str, question: &str) -> Result<String> {
    if !template.contains("{question}") {
        return Err(Error::config("task.prompt", template, "must contain `{question}`"));
    }
    Ok(template.replace("{question}", question))
}

/// How free text is cut into episodes, after the paper: a paragraph that begins with one of
/// `markers` starts a new episode when at least `min_paragraphs` paragraphs have passed since
/// the last start, and an episode is closed after `max_paragraphs` paragraphs regardless.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpisodeMarkers {
    pub markers: Vec<String>,
    pub min_paragraphs: usize,
    pub max_paragraphs: usize,
}

impl Default for EpisodeMarkers {
    fn default() -> Self {
        Self {
            markers: [
                "Wait",
                "But wait",
                "Alternatively",
                "Hmm",
                "Let me double-check",
                "Let me check",
                "On second thought",
            ]
            .map(String::from)
            .to_vec(),
            min_paragraphs: 3,
            max_paragraphs: 10,
        }
    }
}

impl EpisodeMarkers {
    pub fn validate(&self) -> Result<()> {
        if self.markers.iter().any(|m| m.trim().is_empty()) {
            return Err(Error::config(
                "task.episodes.markers",
                format!("{:?}", self.markers),
                "markers must not be empty",
            ));
        }
        if self.min_paragraphs == 0 || self.max_paragraphs < self.min_paragraphs {
            return Err(Error::config(
                "task.episodes.max_paragraphs",
                self.max_paragraphs,
                format!("need 1 ≤ min_paragraphs ({}) ≤ max_paragraphs", self.min_paragraphs),
            ));
        }
        Ok(())
    }

    /// Byte offsets where episodes 1, 2, … begin (episode 0 begins at 0). Paragraphs are
    /// separated by blank lines; a marker must be a whole word at the paragraph's start
    /// (`Waiting` is not `Wait`).
    pub fn episode_starts(&self, text: &str) -> Vec<usize> {
        let mut starts = Vec::new();
        let mut since = 0usize; // paragraphs in the current episode
        let mut at = 0usize;
        for paragraph in text.split("\n\n") {
            let offset = at;
            at += paragraph.len() + 2;
            let body = paragraph.trim_start();
            if body.is_empty() {
                continue;
            }
            let marked = self.markers.iter().any(|m| {
                body.strip_prefix(m.as_str())
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_alphanumeric()))
            });
            if since > 0 && ((marked && since >= self.min_paragraphs) || since >= self.max_paragraphs) {
                starts.push(offset + (paragraph.len() - body.len()));
                since = 0;
            }
            since += 1;
        }
        starts
    }
}

/// `n` arithmetic word problems from templates, a pure function of `seed` (the sample file
/// `data/samples/math.jsonl` is `sample_problems(SAMPLE_SIZE, 0)`).
pub fn sample_problems(n: usize, seed: u64) -> Vec<MathProblem> {
    const NAMES: [&str; 6] = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay"];
    const ITEMS: [&str; 6] = ["apples", "marbles", "stamps", "books", "shells", "cards"];
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let name = NAMES[rng.random_range(0..NAMES.len())];
            let item = ITEMS[rng.random_range(0..ITEMS.len())];
            let (a, b, c) = (
                rng.random_range(2..=40i64),
                rng.random_range(2..=12i64),
                rng.random_range(2..=9i64),
            );
            let (question, answer) = match i % 6 {
                0 => (
                    format!("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"),
                    a + b,
                ),
                1 => (
                    format!(
                        "{name} had {} {item} and gave away {b}. How many {item} are left?",
                        a + b
                    ),
                    a,
                ),
                2 => (
                    format!("A shelf has {b} rows with {c} {item} in each row. How many {item} are on the shelf?"),
                    b * c,
                ),
                3 => (
                    format!(
                        "{name} shares {} {item} equally among {c} friends. How many {item} does each friend get?",
                        b * c
                    ),
                    b,
                ),
                4 => (
                    format!(
                        "{name} buys {c} bags of {b} {item} and then loses {} of them. How many {item} remain?",
                        b - 1
                    ),
                    c * b - (b - 1),
                ),
                _ => (format!("What is {a} plus {b}, multiplied by {c}?"), (a + b) * c),
            };
            MathProblem {
                question,
                answer: answer.to_string(),
            }
        })
        .collect()
}

/// Problems in the sample file.
pub const SAMPLE_SIZE: usize = 36;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episodes_start_at_markers_a_few_paragraphs_apart() {
        let m = EpisodeMarkers::default();
        let paragraphs = [
            "Add them: 7 + 5 = 12.",
            "Check the units.",
            "So 12 apples.",
            "Wait, she gave 2 away.",
            "Hmm, too soon.",
            "Then 10.",
            "Waiting is not a marker.",
            "Alternatively, count down.",
            "10.",
        ];
        let text = paragraphs.join("\n\n");
        let starts = m.episode_starts(&text);
        let begins: Vec<&str> = starts
            .iter()
            .map(|&s| text[s..].split("\n\n").next().unwrap())
            .collect();
        // "Hmm" comes one paragraph after the "Wait" episode began (< 3): no cut.
        assert_eq!(begins, ["Wait, she gave 2 away.", "Alternatively, count down."]);
        // Without markers, max_paragraphs closes episodes.
        let long = vec!["step."; 25].join("\n\n");
        assert_eq!(m.episode_starts(&long).len(), 2);
        assert!(EpisodeMarkers {
            min_paragraphs: 0,
            ..m.clone()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn sample_problems_are_deterministic_and_answerable() {
        let a = sample_problems(SAMPLE_SIZE, 0);
        assert_eq!(a, sample_problems(SAMPLE_SIZE, 0));
        assert_ne!(a, sample_problems(SAMPLE_SIZE, 1));
        assert!(a.iter().all(|p| p.answer.parse::<i64>().is_ok_and(|v| v > 0)));
        assert_eq!(render_prompt("Q: {question}\nA:", "1+1?").unwrap(), "Q: 1+1?\nA:");
        assert!(render_prompt("no placeholder", "x").is_err());
    }
}
