//! Experiment regimes: named configurations committed under `experiments/` (and compiled into
//! the binary, so `experiment --regime NAME` works from any directory). A regime fixes the
//! task, model, step counts, algorithms with their α (chosen on the validation split by
//! `experiment --sweep`), warm-start and RL seeds, and the evaluation.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::rl::config::{merge_json, Algo, RunConfig};

/// The committed regimes, in the order `--regime all` runs them.
const REGIMES: [(&str, &str); 3] = [
    ("search", include_str!("../../experiments/search.json")),
    ("search-tight", include_str!("../../experiments/search-tight.json")),
    ("countdown", include_str!("../../experiments/countdown.json")),
];

/// One algorithm of a regime and its own config patch (α, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgoSpec {
    pub algo: String,
    #[serde(default)]
    pub config: Value,
}

/// The final evaluation of every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    /// Held-out problems.
    pub problems: usize,
    /// Samples per problem at the training budget (maj@k goes up to this; ≤ 16).
    pub samples: usize,
    /// Samples per problem at twice the budget (free to stop, and budget forcing).
    pub extended_samples: usize,
}

/// The α sweep on the validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub alphas: Vec<f64>,
    /// RL seeds per (algorithm, α), all from the first warm start.
    pub seeds: usize,
    /// Validation problems and samples per problem of the sweep's evaluation.
    pub problems: usize,
    pub samples: usize,
}

/// A regime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Regime {
    pub name: String,
    /// What the regime tests, and why it leaves outcome-only RL room to fail.
    pub about: String,
    pub task: String,
    pub preset: String,
    /// Run-config patch shared by every run (the format of `train --config`).
    #[serde(default)]
    pub config: Value,
    pub algos: Vec<AlgoSpec>,
    /// Seeds of the warm starts; RL seed s starts from warm start s mod their count.
    pub warm_start_seeds: Vec<u64>,
    /// RL seeds 0 … rl_seeds − 1, each run by every algorithm (paired).
    pub rl_seeds: u64,
    pub report: ReportSpec,
    pub sweep: SweepSpec,
}

/// Names accepted by `--regime` (besides `all`).
pub fn names() -> Vec<&'static str> {
    REGIMES.iter().map(|r| r.0).collect()
}

impl Regime {
    /// A committed regime by name.
    pub fn named(name: &str) -> Result<Self> {
        let (_, text) = REGIMES.iter().find(|r| r.0 == name).ok_or_else(|| Error::Unknown {
            kind: "regime",
            name: name.into(),
            expected: format!("{}, all", names().join(", ")),
        })?;
        Self::parse(text, name)
    }

    /// Parses and checks a regime's JSON (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let regime: Regime = serde_json::from_str(text).map_err(|e| Error::Json {
            path: format!("experiments/{origin}.json").into(),
            reason: e.to_string(),
        })?;
        regime.validate()?;
        Ok(regime)
    }

    fn validate(&self) -> Result<()> {
        if self.algos.is_empty() || self.warm_start_seeds.is_empty() || self.rl_seeds == 0 {
            return Err(Error::config(
                format!("regime {}", self.name),
                "algos / seeds",
                "needs at least one algorithm, warm start and RL seed",
            ));
        }
        if self.report.samples == 0
            || self.report.samples > 16
            || self.report.extended_samples == 0
            || self.report.problems == 0
        {
            return Err(Error::config(
                format!("regime {}.report", self.name),
                self.report.samples,
                "samples in 1..=16, extended_samples and problems positive",
            ));
        }
        for spec in &self.algos {
            self.run_config(spec, 0)?.validate()?;
        }
        Ok(())
    }

    /// The run config of one algorithm of the regime at RL seed `seed`: the defaults of the
    /// task and preset, the regime's patch, then the algorithm's.
    pub fn run_config(&self, spec: &AlgoSpec, seed: u64) -> Result<RunConfig> {
        let algo = Algo::parse(&spec.algo)?;
        let mut patch = self.config.clone();
        if patch.is_null() {
            patch = Value::Object(Default::default());
        }
        if !spec.config.is_null() {
            merge_json(&mut patch, spec.config.clone());
        }
        let mut config = RunConfig::with_patch(&self.task, &self.preset, algo, seed, true, Some(patch))?;
        config.rl.algo = algo;
        config.seed = seed;
        Ok(config)
    }

    /// The smoke version: every stage with tiny step counts and evaluations (numbers mean
    /// nothing), two RL seeds, at most two warm starts.
    pub fn quick(&self) -> Self {
        let mut q = self.clone();
        let shrink = serde_json::json!({
            "warm_start": {"steps": 40, "eval_every": 0, "checkpoint_every": 0},
            "rl": {"steps": 4, "eval_every": 2, "checkpoint_every": 0},
            "eval": {"problems": 6, "samples": 1}
        });
        if q.config.is_null() {
            q.config = Value::Object(Default::default());
        }
        merge_json(&mut q.config, shrink);
        q.warm_start_seeds.truncate(2);
        q.rl_seeds = 2;
        q.report = ReportSpec {
            problems: 6,
            samples: 2,
            extended_samples: 1,
        };
        q.sweep = SweepSpec {
            alphas: q.sweep.alphas.iter().copied().take(2).collect(),
            seeds: 1,
            problems: 6,
            samples: 2,
        };
        q
    }
}
