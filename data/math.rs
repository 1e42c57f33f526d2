//! The text side of the `math` task family: problems with a final answer read from a JSONL
//! file, the answer a model gives (the last `\boxed{…}` of its text), whether two answers are
//! the same number or expression, free-text reasoning split into episodes at the paper's
//! markers, and a sample file of arithmetic word problems that the project writes itself.
//!
//! Everything here is a pure function of text, so it is tested without a model; the rollout
//! side (prompting a pretrained model, the forced-termination suffix, budget forcing) builds
//! on it.

use std::fs;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

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

/// The content of the last `\boxed{…}` (or `\fbox{…}`) in `text`, braces balanced; `None`
/// when there is none or it is never closed.
pub fn last_boxed(text: &str) -> Option<&str> {
    let open = ["\\boxed{", "\\fbox{"]
        .iter()
        .filter_map(|m| text.rfind(m).map(|i| i + m.len() - 1))
        .max()?;
    braced(text, open).map(|(inner, _)| inner)
}

/// A reduced fraction p/q, q > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rational {
    pub num: i128,
    pub den: i128,
}

impl Rational {
    fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num.unsigned_abs(), den.unsigned_abs()).max(1) as i128;
        let sign = if den < 0 { -1 } else { 1 };
        Some(Self {
            num: sign * num / g,
            den: sign * den / g,
        })
    }
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// An integer or a terminating decimal (`-12`, `3.50`, `.5`) as an exact fraction.
fn decimal(s: &str) -> Option<Rational> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
        || whole.len() + frac.len() > 30
    {
        return None;
    }
    let num: i128 = format!("{whole}{frac}").parse().ok()?;
    Rational::new(if neg { -num } else { num }, 10i128.checked_pow(frac.len() as u32)?)
}

/// The value of a normalised answer that is a number: an integer, a decimal, `a/b` of those,
/// with an optional sign.
pub fn number(s: &str) -> Option<Rational> {
    if let Some((a, b)) = s.split_once('/') {
        let (a, b) = (decimal(a)?, decimal(b)?);
        return Rational::new(a.num.checked_mul(b.den)?, a.den.checked_mul(b.num)?);
    }
    decimal(s)
}

/// Spacing, math-mode and formatting commands that never change an answer's value.
const NOISE: [&str; 14] = [
    "\\left",
    "\\right",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\ ",
    "$",
    "^\\circ",
    "^{\\circ}",
    "\\%",
    "%",
    "\\displaystyle",
    "\\mathrm",
];

/// A canonical spelling of an answer: LaTeX noise, `\text{…}` wrappers, a leading `x =`,
/// thousands separators and a trailing period removed, `\frac{a}{b}` written `a/b`, and a
/// number written as its reduced fraction (`0.50`, `1/2` and `\frac{2}{4}` all become `1/2`).
pub fn normalize(answer: &str) -> String {
    let mut s = answer.trim().to_string();
    for wrapper in ["\\text{", "\\textbf{", "\\mathbf{", "\\mbox{"] {
        s = unwrap_command(&s, wrapper);
    }
    for noise in NOISE {
        s = s.replace(noise, "");
    }
    for frac in ["\\dfrac", "\\tfrac"] {
        s = s.replace(frac, "\\frac");
    }
    s = fracs_as_slashes(&s);
    s.retain(|c| !c.is_whitespace());
    let s = s.trim_end_matches('.');
    // `x=5`, `n=5`: the value is what counts.
    let s = match s.split_once('=') {
        Some((lhs, rhs)) if lhs.len() <= 2 && lhs.chars().all(|c| c.is_ascii_alphabetic()) => rhs,
        _ => s,
    };
    let s = if is_thousands(s) {
        s.replace(',', "")
    } else {
        s.to_string()
    };
    match number(&s) {
        Some(r) if r.den == 1 => r.num.to_string(),
        Some(r) => format!("{}/{}", r.num, r.den),
        None => s.to_lowercase(),
    }
}

/// Whether `pred` and `gold` are the same answer after [`normalize`].
pub fn equivalent(pred: &str, gold: &str) -> bool {
    normalize(pred) == normalize(gold)
}

/// `1,234,567` (digits in groups of three after the first).
fn is_thousands(s: &str) -> bool {
    let body = s.strip_prefix('-').unwrap_or(s);
    let mut groups = body.split(',');
    let first = groups.next().unwrap_or("");
    body.contains(',')
        && (1..=3).contains(&first.len())
        && first.chars().all(|c| c.is_ascii_digit())
        && groups.all(|g| g.len() == 3 && g.chars().all(|c| c.is_ascii_digit()))
}

/// `\cmd{x}` → `x`, for every occurrence (braces balanced).
fn unwrap_command(s: &str, cmd: &str) -> String {
    let mut out = s.to_string();
    while let Some(at) = out.find(cmd) {
        let Some((inner, end)) = braced(&out, at + cmd.len() - 1) else {
            break;
        };
        out = format!("{}{}{}", &out[..at], inner, &out[end..]);
    }
    out
}

/// `\frac{a}{b}` → `(a)/(b)` unless a and b are plain, then `a/b`.
fn fracs_as_slashes(s: &str) -> String {
    let mut out = s.to_string();
    while let Some(at) = out.find("\\frac{") {
        let Some((a, after_a)) = braced(&out, at + 5) else {
            break;
        };
        let Some((b, end)) = braced(&out, after_a) else {
            break;
        };
        let plain = |x: &str| x.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
        let (a, b) = if plain(a) && plain(b) {
            (a.to_string(), b.to_string())
        } else {
            (format!("({a})"), format!("({b})"))
        };
        out = format!("{}{a}/{b}{}", &out[..at], &out[end..]);
    }
    out
}

/// The text inside the brace group that opens at byte `open` (which must be `{`), and the
/// byte after its closing brace; `None` when it is never closed.
fn braced(s: &str, open: usize) -> Option<(&str, usize)> {
    if s.as_bytes().get(open) != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&s[open + 1..open + i], open + i + 1));
                }
            }
            _ => {}
        }
    }
    None
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
    fn the_last_boxed_answer_counts() {
        assert_eq!(
            last_boxed("so \\boxed{3}. Wait, no: \\boxed{\\frac{1}{2}} is it"),
            Some("\\frac{1}{2}")
        );
        assert_eq!(last_boxed("\\fbox{7} and nothing else"), Some("7"));
        assert_eq!(last_boxed("\\boxed{12"), None);
        assert_eq!(last_boxed("no answer"), None);
    }

    #[test]
    fn equal_values_are_equal_answers() {
        let same = [
            ("42", "42"),
            ("42.0", "42"),
            ("0.5", "\\frac{1}{2}"),
            ("\\dfrac{2}{4}", "1/2"),
            ("-3/6", "-0.5"),
            ("1,234", "1234"),
            ("$x = 5$", "5"),
            ("\\text{12 apples}", "12apples"),
            ("50\\%", "50"),
            ("\\left( 3 \\right)", "(3)"),
            ("7.", "7"),
        ];
        for (a, b) in same {
            assert!(equivalent(a, b), "{a} vs {b}: {} / {}", normalize(a), normalize(b));
        }
        let different = [
            ("42", "24"),
            ("1/2", "1/3"),
            ("0.33", "1/3"),
            ("1,23", "123"),
            ("x", "y"),
        ];
        for (a, b) in different {
            assert!(!equivalent(a, b), "{a} vs {b}");
        }
        assert_eq!(normalize("\\frac{a+1}{2}"), "(a+1)/(2)");
        assert_eq!(number("3/0"), None);
    }

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
