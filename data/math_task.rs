//! The `math` task family: problems from a JSONL file, for pretrained models that write free
//! text. As a [`Task`] it is the problem source (a problem drawn uniformly from the file,
//! split by its question) and the verifier; the token stream's rules — prompt text, episodes
//! at markers, the forced-termination text, budget forcing — are its [`TextFormat`], which
//! `rl::protocol::TextProtocol` applies through the model's own tokenizer.
//!
//! The word-level parts of [`Task`] have no meaning here: there is no task vocabulary (the
//! tokenizer is the model's), no interactive reply, no listable set of correct answers (the
//! meta-prover samples), and no scripted warm-start traces (the model is pretrained; a run
//! configuration with warm-start steps is refused).

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::datasets::AnswerStyle;
use super::math::{equivalent, read_jsonl, render_prompt, EpisodeMarkers, MathProblem};
use super::task::{validate_split_fractions, Problem, Task};
use super::trace::Trace;
use crate::error::{Error, Result};

/// The text a pretrained model is prompted with and forced by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextFormat {
    /// The user's turn, with `{question}` where the problem goes. A chat model sees it through
    /// its own chat template (after `system`, with the assistant's turn opened), as
    /// `transformers`' `apply_chat_template` renders it.
    pub user: String,
    /// A system turn before the user's, for a chat template; none by default (a template may
    /// add its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The whole prompt, with `{question}`: when set, used as it is instead of the chat
    /// template. A model without a template is prompted with the user's turn followed by
    /// `\n<think>\n`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Where episodes begin.
    pub episodes: EpisodeMarkers,
    /// The meta-prover's forced-termination text, fed at an episode boundary; it ends where
    /// the answer's first token goes, inside `\boxed{`.
    pub suffix: String,
    /// What budget forcing feeds instead of the end of thinking: the opening of a new episode.
    pub wait: String,
    /// How the model's own (unforced) answer is read from its text.
    pub answer: AnswerStyle,
}

impl Default for TextFormat {
    fn default() -> Self {
        Self {
            user: "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.".into(),
            system: None,
            prompt: None,
            episodes: EpisodeMarkers::default(),
            suffix: "\n\nTime is up. Given the time I've spent and the approaches I've tried, I should stop \
                thinking and give my \
                     final answer now.\n</think>\n\nThe final answer is \\boxed{"
                .into(),
            wait: "\n\nWait".into(),
            answer: AnswerStyle::Boxed,
        }
    }
}

impl TextFormat {
    pub fn validate(&self) -> Result<()> {
        render_prompt(&self.user, "")
            .map_err(|_| Error::config("task.format.user", &self.user, "must contain `{question}`"))?;
        if let Some(prompt) = &self.prompt {
            render_prompt(prompt, "")
                .map_err(|_| Error::config("task.format.prompt", prompt, "must contain `{question}`"))?;
        }
        self.episodes.validate()?;
        if !self.suffix.trim_end().ends_with('{') {
            return Err(Error::config(
                "task.format.suffix",
                &self.suffix,
                "must end inside an opened `\\boxed{` (the forced answer closes that brace)",
            ));
        }
        if self.wait.trim().is_empty() {
            return Err(Error::config("task.format.wait", &self.wait, "must not be empty"));
        }
        Ok(())
    }

    /// The user's turn for `question`.
    pub fn user_turn(&self, question: &str) -> String {
        self.user.replace("{question}", question)
    }

    /// The prompt of a model without a chat template (or of an explicit `prompt`).
    pub fn plain_prompt(&self, question: &str) -> String {
        match &self.prompt {
            Some(p) => p.replace("{question}", question),
            None => format!("{}\n<think>\n", self.user_turn(question)),
        }
    }
}

/// Configuration of the `math` task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MathConfig {
    /// JSONL file: one `{"question": …, "answer": …}` per line.
    pub data: PathBuf,
    /// Episode budget of a training rollout (episodes end at the format's markers).
    pub max_episodes: usize,
    pub held_out_fraction: f64,
    pub validation_fraction: f64,
    #[serde(default)]
    pub format: TextFormat,
}

impl Default for MathConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::from("data/samples/math.jsonl"),
            max_episodes: 8,
            held_out_fraction: 0.2,
            validation_fraction: 0.1,
            format: TextFormat::default(),
        }
    }
}

/// Problems of one JSONL file.
pub struct Math {
    config: MathConfig,
    problems: Vec<MathProblem>,
}

impl Math {
    /// Reads and checks the file. Questions listed twice are kept once (the first answer).
    pub fn new(config: MathConfig) -> Result<Self> {
        validate_split_fractions(config.held_out_fraction, config.validation_fraction)?;
        config.format.validate()?;
        if config.max_episodes == 0 {
            return Err(Error::config("task.max_episodes", 0, "must be positive"));
        }
        let mut problems = read_jsonl(&config.data)?;
        let mut seen = std::collections::HashSet::new();
        problems.retain(|p| seen.insert(p.question.clone()));
        if problems.is_empty() {
            return Err(Error::config("task.data", config.data.display(), "holds no problems"));
        }
        Ok(Self { config, problems })
    }

    pub fn format(&self) -> &TextFormat {
        &self.config.format
    }

    pub fn problems(&self) -> &[MathProblem] {
        &self.problems
    }

    fn problem<'a>(&self, p: &'a Problem) -> &'a MathProblem {
        match p {
            Problem::Math(m) => m,
            other => panic!("math task given a foreign problem: {other:?}"),
        }
    }
}

impl Task for Math {
    fn name(&self) -> &'static str {
        "math"
    }

    fn words(&self) -> Vec<String> {
        Vec::new()
    }

    fn max_episodes(&self) -> usize {
        self.config.max_episodes
    }

    fn held_out_fraction(&self) -> f64 {
        self.config.held_out_fraction
    }

    fn validation_fraction(&self) -> f64 {
        self.config.validation_fraction
    }

    fn key(&self, problem: &Problem) -> String {
        self.problem(problem).question.clone()
    }

    fn generate(&self, rng: &mut StdRng) -> Problem {
        Problem::Math(self.problems[rng.random_range(0..self.problems.len())].clone())
    }

    /// The rendered prompt as one piece of text (the tokenizer is the model's).
    fn prompt(&self, problem: &Problem) -> Vec<String> {
        vec![self.config.format.plain_prompt(&self.problem(problem).question)]
    }

    fn verify(&self, problem: &Problem, answer: &[String]) -> bool {
        !answer.is_empty() && equivalent(&answer.join(" "), &self.problem(problem).answer)
    }

    fn well_formed(&self, answer: &[String]) -> bool {
        answer.iter().any(|a| !a.trim().is_empty())
    }

    fn reply(&self, _problem: &Problem, _episode: &[String]) -> Option<Vec<String>> {
        None
    }

    fn correct_answers(&self, _problem: &Problem) -> Option<Vec<Vec<String>>> {
        None
    }

    fn enumerable_answers(&self) -> bool {
        false
    }

    fn starts_answer(&self, _word: &str) -> bool {
        false
    }

    fn strategies(&self) -> &'static [&'static str] {
        &[]
    }

    /// No scripted traces exist for free text; the configuration refuses a warm start, so this
    /// is never called with a strategy.
    fn scripted_trace(
        &self,
        _problem: &Problem,
        _strategy: &str,
        _cut_after: Option<usize>,
        _rng: &mut StdRng,
    ) -> Trace {
        Trace::default()
    }
}
