//! Ferry: a reverse proxy that turns deferrable OpenAI-style chat completions
//! into Batch API jobs and hands each caller its own answer back.

pub mod announce;
pub mod api_error;
pub mod emulator;
