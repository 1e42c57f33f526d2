//! The answer a model gives and whether it is the reference's: the last `\boxed{…}` of its
//! text, and equality after one canonical spelling (LaTeX spacing and `$` dropped, `\text{…}`
//! unwrapped, a leading `x =` and thousands separators removed, and numbers as reduced
//! fractions, so `0.5`, `\frac{1}{2}` and `1/2` agree). Pure functions of text, used by
//! data/math.rs and the text protocol's judge.

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
}
