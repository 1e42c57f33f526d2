//! Math data sets as users have them, one JSON object per line, the layout told from each
//! line's fields:
//!
//! | layout | fields | reference answer |
//! |---|---|---|
//! | GSM8K | `question`, `answer` ending `#### N` | N, thousands separators removed |
//! | MATH-500 | `problem`, `answer` | `answer` |
//! | MATH | `problem`, `solution` | the last `\boxed{…}` of `solution` |
//! | SVAMP | `Body`, `Question`, `Answer` | `Answer` (a number) |
//! | ASDiv | `body`, `question`, `answer` like `9 (apples)` | the number before the unit |
//! | MAWPS | `input`, `target` | `target` |
//! | plain | `question`, `answer` | `answer` (a string or a number) |
//!
//! A line that fits none is an error naming the line and the fields it has. The model's own
//! answer is read by [`AnswerStyle`]: the last `\boxed{…}` (the default, what the prompt asks
//! for), or GSM8K's convention (the number after `####`, else the last number in the text).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::math::{last_boxed, MathProblem};

/// How a model's free-text answer is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerStyle {
    /// The content of the last `\boxed{…}`.
    #[default]
    Boxed,
    /// The number after the last `####`, else the last number of the text (GSM8K's convention).
    Gsm8k,
}

impl AnswerStyle {
    /// The answer in `text`, `None` when it holds none.
    pub fn extract(self, text: &str) -> Option<String> {
        match self {
            AnswerStyle::Boxed => last_boxed(text).map(str::to_string),
            AnswerStyle::Gsm8k => match text.rfind("####") {
                Some(at) => first_number(&text[at + 4..]),
                None => last_number(text),
            },
        }
    }
}

/// Which layout a line has (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Gsm8k,
    Math500,
    Math,
    Svamp,
    Asdiv,
    Mawps,
    Plain,
}

/// A number token: digits with optional sign, thousands separators and decimals.
fn numbers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let signed = chars[i] == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if chars[i].is_ascii_digit() || signed {
            let start = i;
            i += 1;
            while i < chars.len() {
                let c = chars[i];
                let joins = (c == ',' || c == '.') && chars.get(i + 1).is_some_and(char::is_ascii_digit);
                if c.is_ascii_digit() || joins {
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(chars[start..i].iter().filter(|&&c| c != ',').collect());
        } else {
            i += 1;
        }
    }
    out
}

fn first_number(text: &str) -> Option<String> {
    numbers(text).into_iter().next()
}

fn last_number(text: &str) -> Option<String> {
    numbers(text).pop()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One line's problem and layout, or why it fits none.
pub fn parse_line(object: &Map<String, Value>) -> Result<(MathProblem, Layout), String> {
    for key in [
        "question", "problem", "answer", "solution", "Body", "Question", "Answer", "body", "input", "target",
    ] {
        if let Some(v) = object.get(key).filter(|v| text(v).is_none()) {
            return Err(format!("field `{key}`: expected a string or a number, found {v}"));
        }
    }
    let get = |k: &str| object.get(k).and_then(text);
    let problem = |question: String, answer: Option<String>, layout| match answer {
        Some(a) if !question.trim().is_empty() && !a.trim().is_empty() => {
            Ok((MathProblem { question, answer: a }, layout))
        }
        _ => Err(format!("empty question or answer (read as the {layout:?} layout)")),
    };
    if let (Some(q), Some(a)) = (get("question"), get("answer")) {
        if let Some(at) = a.rfind("####") {
            return problem(q, first_number(&a[at + 4..]), Layout::Gsm8k);
        }
        if let Some(body) = get("body") {
            let number = first_number(&a);
            return problem(format!("{} {}", body.trim(), q.trim()), number, Layout::Asdiv);
        }
        return problem(q, Some(a), Layout::Plain);
    }
    if let Some(p) = get("problem") {
        if let Some(a) = get("answer") {
            return problem(p, Some(a), Layout::Math500);
        }
        if let Some(s) = get("solution") {
            return problem(p, last_boxed(&s).map(str::to_string), Layout::Math);
        }
    }
    if let (Some(b), Some(q), Some(a)) = (get("Body"), get("Question"), get("Answer")) {
        return problem(format!("{} {}", b.trim(), q.trim()), Some(a), Layout::Svamp);
    }
    if let (Some(q), Some(a)) = (get("input"), get("target")) {
        return problem(q, Some(a), Layout::Mawps);
    }
    let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
    fields.sort_unstable();
    Err(format!(
        "fields {fields:?} fit no known layout (question+answer, GSM8K's answer with `####`, problem+answer, \
         problem+solution with \\boxed{{}}, SVAMP's Body+Question+Answer, ASDiv's body+question+answer, input+target)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<(MathProblem, Layout), String> {
        parse_line(serde_json::from_str::<Value>(json).unwrap().as_object().unwrap())
    }

    #[test]
    fn every_layout_gives_its_reference_answer() {
        let cases = [
            (
                r##"{"question": "Q", "answer": "She makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018"}"##,
                "1018",
                Layout::Gsm8k,
            ),
            (
                r#"{"problem": "P", "answer": "\\frac{1}{2}", "level": 2}"#,
                "\\frac{1}{2}",
                Layout::Math500,
            ),
            (
                r#"{"problem": "P", "solution": "So \\boxed{3} and then \\boxed{\\frac{a}{b}}."}"#,
                "\\frac{a}{b}",
                Layout::Math,
            ),
            (
                r#"{"Body": "There are 87 oranges.", "Question": "How many?", "Answer": 145.0}"#,
                "145.0",
                Layout::Svamp,
            ),
            (
                r#"{"body": "Seven apples.", "question": "How many?", "answer": "9 (apples)"}"#,
                "9",
                Layout::Asdiv,
            ),
            (
                r#"{"input": "Joan found 70 seashells.", "target": 43.0}"#,
                "43.0",
                Layout::Mawps,
            ),
            (r#"{"question": "Q", "answer": 42}"#, "42", Layout::Plain),
        ];
        for (line, answer, layout) in cases {
            let (p, l) = parse(line).unwrap();
            assert_eq!((p.answer.as_str(), l), (answer, layout), "{line}");
        }
        let (p, _) = parse(r#"{"Body": "There are 87 oranges.", "Question": "How many?", "Answer": 1}"#).unwrap();
        assert_eq!(p.question, "There are 87 oranges. How many?");
    }

    #[test]
    fn a_line_of_no_layout_names_its_fields() {
        let err = parse(r#"{"prompt": "x", "label": 3}"#).unwrap_err();
        assert!(err.contains("[\"label\", \"prompt\"]"), "{err}");
        let err = parse(r#"{"problem": "P", "answer": [2]}"#).unwrap_err();
        assert!(
            err.contains("field `answer`: expected a string or a number, found [2]"),
            "{err}"
        );
        let err = parse(r#"{"problem": "P", "solution": "no box here"}"#).unwrap_err();
        assert!(
            err.contains("empty question or answer (read as the Math layout)"),
            "{err}"
        );
    }

    #[test]
    fn answers_are_read_boxed_or_by_gsm8k_convention() {
        let text = "3 + 4 = 7, so 7 * 2 = 14.\n#### 14";
        assert_eq!(AnswerStyle::Gsm8k.extract(text).as_deref(), Some("14"));
        assert_eq!(AnswerStyle::Boxed.extract(text), None);
        assert_eq!(
            AnswerStyle::Gsm8k.extract("It costs $1,234.50 in total.").as_deref(),
            Some("1234.50")
        );
        assert_eq!(AnswerStyle::Gsm8k.extract("from -3 to -12.").as_deref(), Some("-12"));
        assert_eq!(AnswerStyle::Gsm8k.extract("no digits"), None);
        assert_eq!(
            AnswerStyle::Boxed.extract("x \\boxed{1} y \\boxed{2}").as_deref(),
            Some("2")
        );
    }
}
