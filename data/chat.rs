//! A chat model's prompt format: its Jinja `chat_template` (from `tokenizer_config.json`,
//! `chat_template.jinja` or a GGUF file's `tokenizer.chat_template`) rendered with
//! `minijinja`, as `transformers`' `apply_chat_template` renders it with `jinja2`.
//!
//! `transformers` renders in a sandboxed `jinja2` environment with `trim_blocks` and
//! `lstrip_blocks` on, loop controls (`break`, `continue`), a `raise_exception(message)`
//! function and Python's string methods (`.strip()`, `.startswith()`, …); the same is set up
//! here (the methods through `minijinja-contrib`'s Python compatibility). The context is
//! `messages` (a list of `{role, content}`), `add_generation_prompt`, `bos_token` and
//! `eos_token`.

use crate::error::{Error, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template with the special tokens it may print.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env
}

impl ChatTemplate {
    /// A template, checked by rendering a one-turn conversation (a template that does not
    /// parse, or fails on the simplest input, is refused here rather than at the first prompt).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let template = Self {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        };
        template.render(&[Message::new("user", "1 + 1?")], true)?;
        Ok(template)
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text of `messages`, with the assistant's turn opened when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        environment()
            .render_str(&self.source, ctx)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e:#}")))
    }
}
