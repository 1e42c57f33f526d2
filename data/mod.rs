//! Tokenizer, task families, verifiers, scripted solvers and batching. Knows no model.

pub mod answer;
pub mod batch;
pub mod chat;
pub mod countdown;
pub mod datasets;
pub mod gguf_tokenizer;
pub mod math;
pub mod math_task;
pub mod search;
pub mod split;
pub mod task;
pub mod text_tokenizer;
pub mod trace;
pub mod vocab;

pub use chat::{ChatTemplate, Message};
pub use split::Split;
pub use task::{sample_problem, split_of, warm_start_trace, Problem, Task, TaskConfig, WarmStartMix};
pub use text_tokenizer::TextTokenizer;
pub use trace::{Role, Tokenized, Trace};
pub use vocab::{Specials, Vocab};
