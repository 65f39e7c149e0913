//! How a question becomes a prompt: a user turn made by a minijinja template (the
//! question and the instruction in), an optional system prompt, and k worked examples
//! drawn from the training split with a fixed seed, rendered through the model's chat
//! template (chat models) or as `Question: …\nAnswer:` blocks (`tiny` and base models).
//!
//! The defaults give the prompts the project has always used, token for token: a chat
//! model's one user turn is the question, a newline and [`DEFAULT_INSTRUCTION`]; a plain
//! model's prompt is `Question: {question}\nAnswer:`.

use crate::config::DataSection;
use anyhow::{Context, Result};
use cal_core::data::gsm8k::strip_notes;
use cal_core::data::Example;
use cal_model::tokenizer::ChatTemplate;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// The instruction after the question for chat models (defined with the configuration's
/// defaults).
pub use crate::config::DEFAULT_INSTRUCTION;

/// How questions are turned into prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptStyle {
    /// `Question: ...\nAnswer:` (the `tiny` model and base models).
    Plain,
    /// The model's chat template.
    Chat,
}

/// One worked example shown before the question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shot {
    pub question: String,
    /// The reference solution as the model should write it (GSM8K's `<<…>>` notes
    /// removed, `#### N` kept).
    pub solution: String,
}

/// The prompt settings in force, resolved (few-shot examples drawn).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptFormat {
    /// minijinja template of the user turn; `None`: the style's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub instruction: String,
    pub shots: Vec<Shot>,
}

impl Default for PromptFormat {
    fn default() -> Self {
        Self {
            template: None,
            system: None,
            instruction: DEFAULT_INSTRUCTION.to_string(),
            shots: Vec::new(),
        }
    }
}

impl PromptFormat {
    /// The run's prompt: `[data]`'s template, system prompt and instruction, with
    /// `few-shot` examples drawn from `train` by `few-shot-seed` (among those with worked
    /// steps, when there are enough). A template that does not parse is an error naming
    /// the key.
    pub fn of(data: &DataSection, train: &[Example]) -> Result<Self> {
        // worked solutions make the examples; a set without any (MAWPS) shows answers
        let worked = |e: &Example| !e.solution_steps().trim().is_empty();
        let mut order: Vec<usize> = (0..train.len()).filter(|&i| worked(&train[i])).collect();
        if order.len() < data.few_shot {
            order = (0..train.len()).collect();
        }
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
            data.few_shot_seed,
        ));
        if data.few_shot > train.len() {
            anyhow::bail!(
                "[data] few-shot = {} but the training split has {} problems",
                data.few_shot,
                train.len()
            );
        }
        let shots = order[..data.few_shot]
            .iter()
            .map(|&i| Shot {
                question: train[i].question.clone(),
                solution: strip_notes(&train[i].answer),
            })
            .collect();
        let f = Self {
            template: data.prompt_template.clone(),
            system: data.system_prompt.clone(),
            instruction: data.instruction.clone(),
            shots,
        };
        f.user_turn("2 + 3?", PromptStyle::Chat)
            .context("[data] prompt-template (--prompt-template)")?;
        Ok(f)
    }

    /// The user turn for `question`: the template, or the style's default.
    pub fn user_turn(&self, question: &str, style: PromptStyle) -> Result<String> {
        match &self.template {
            Some(t) => {
                let env = minijinja::Environment::new();
                let tpl = env.template_from_str(t)?;
                Ok(tpl.render(minijinja::context! {
                    question => question,
                    instruction => &self.instruction,
                })?)
            }
            None => Ok(match style {
                PromptStyle::Chat => format!("{question}\n{}", self.instruction),
                PromptStyle::Plain => question.to_string(),
            }),
        }
    }

    /// The whole prompt text for `question`. A shot with the same question is left out,
    /// so a training problem never shows its own solution.
    pub fn render(
        &self,
        question: &str,
        style: PromptStyle,
        chat: Option<&ChatTemplate>,
    ) -> Result<String> {
        let shots: Vec<&Shot> = self
            .shots
            .iter()
            .filter(|s| s.question != question)
            .collect();
        match (style, chat) {
            (PromptStyle::Chat, Some(t)) => {
                let mut turns: Vec<(String, String)> = Vec::new();
                if let Some(s) = &self.system {
                    turns.push(("system".into(), s.clone()));
                }
                for s in shots {
                    turns.push(("user".into(), self.user_turn(&s.question, style)?));
                    turns.push(("assistant".into(), s.solution.clone()));
                }
                turns.push(("user".into(), self.user_turn(question, style)?));
                let msgs: Vec<(&str, &str)> = turns
                    .iter()
                    .map(|(r, c)| (r.as_str(), c.as_str()))
                    .collect();
                t.render(&msgs, true)
            }
            _ => {
                let mut out = String::new();
                if let Some(s) = &self.system {
                    out.push_str(s);
                    out.push_str("\n\n");
                }
                for s in shots {
                    let q = self.user_turn(&s.question, PromptStyle::Plain)?;
                    out.push_str(&format!("Question: {q}\nAnswer: {}\n\n", s.solution));
                }
                let q = self.user_turn(question, PromptStyle::Plain)?;
                out.push_str(&format!("Question: {q}\nAnswer:"));
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(i: u64) -> Example {
        Example::new(
            i,
            format!("Q{i}?"),
            format!("{i}*2=<<{i}*2={}>>{} apples\n#### {}", 2 * i, 2 * i, 2 * i),
        )
        .unwrap()
    }

    #[test]
    fn defaults_are_the_prompts_of_old() {
        let f = PromptFormat::default();
        assert_eq!(
            f.render("What is 2+3?", PromptStyle::Plain, None).unwrap(),
            "Question: What is 2+3?\nAnswer:"
        );
        assert_eq!(
            f.user_turn("What is 2+3?", PromptStyle::Chat).unwrap(),
            format!("What is 2+3?\n{DEFAULT_INSTRUCTION}")
        );
        assert_eq!(PromptFormat::of(&DataSection::default(), &[]).unwrap(), f);
    }

    /// SmolLM2's template (ChatML with a default system turn), as its GGUF carries it.
    fn chatml() -> ChatTemplate {
        ChatTemplate::new(
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}".into(),
            "<|im_end|>".into(),
            None,
        )
    }

    #[test]
    fn chat_prompts_by_default_are_one_user_turn_as_before() {
        let t = chatml();
        let q = "Ann has 3 pens. How many?";
        let old = t
            .render(&[("user", &format!("{q}\n{DEFAULT_INSTRUCTION}"))], true)
            .unwrap();
        let new = PromptFormat::default()
            .render(q, PromptStyle::Chat, Some(&t))
            .unwrap();
        assert_eq!(new, old);
        // a system prompt replaces the template's default one; shots are turns
        let f = PromptFormat {
            system: Some("Be exact.".into()),
            shots: vec![Shot {
                question: "1+1?".into(),
                solution: "1 + 1 = 2\n#### 2".into(),
            }],
            ..PromptFormat::default()
        };
        let text = f.render(q, PromptStyle::Chat, Some(&t)).unwrap();
        assert!(
            text.starts_with("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n1+1?\n"),
            "{text}"
        );
        assert!(
            text.contains("<|im_start|>assistant\n1 + 1 = 2\n#### 2<|im_end|>"),
            "{text}"
        );
        assert!(text.ends_with(&format!(
            "{q}\n{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
        )));
        assert!(!text.contains("SmolLM"));
    }

    #[test]
    fn few_shot_examples_are_drawn_by_seed_and_never_the_question_itself() {
        let train: Vec<Example> = (1..=20).map(ex).collect();
        let d = |seed| DataSection {
            few_shot: 2,
            few_shot_seed: seed,
            ..DataSection::default()
        };
        let a = PromptFormat::of(&d(0), &train).unwrap();
        assert_eq!(a, PromptFormat::of(&d(0), &train).unwrap());
        assert_ne!(a.shots, PromptFormat::of(&d(1), &train).unwrap().shots);
        assert_eq!(a.shots.len(), 2);
        // notes removed, the final line kept
        let s = &a.shots[0];
        assert!(!s.solution.contains("<<") && s.solution.contains("#### "));
        // worked solutions are preferred to bare answers
        let mut mixed: Vec<Example> = (1..=20)
            .map(|i| Example::new(i, format!("B{i}?"), format!("#### {i}")).unwrap())
            .collect();
        mixed.extend((1..=2).map(ex));
        let m = PromptFormat::of(&d(0), &mixed).unwrap();
        assert!(
            m.shots.iter().all(|s| s.question.starts_with('Q')),
            "{:?}",
            m.shots
        );
        let text = a.render("Q99?", PromptStyle::Plain, None).unwrap();
        assert_eq!(text.matches("Question: ").count(), 3, "{text}");
        assert!(text.ends_with("Question: Q99?\nAnswer:"));
        // the shot's own question is asked without its solution shown
        let own = a.render(&s.question, PromptStyle::Plain, None).unwrap();
        assert_eq!(own.matches("Question: ").count(), 2, "{own}");
        let too_many = DataSection {
            few_shot: 21,
            ..DataSection::default()
        };
        assert!(PromptFormat::of(&too_many, &train).is_err());
    }

    #[test]
    fn templates_and_system_prompts_shape_the_turn() {
        let d = DataSection {
            prompt_template: Some("Problem: {{ question }}\n{{ instruction }}".into()),
            system_prompt: Some("You are a careful tutor.".into()),
            instruction: "Answer with #### N.".into(),
            ..DataSection::default()
        };
        let f = PromptFormat::of(&d, &[]).unwrap();
        assert_eq!(
            f.user_turn("2+3?", PromptStyle::Chat).unwrap(),
            "Problem: 2+3?\nAnswer with #### N."
        );
        assert_eq!(
            f.render("2+3?", PromptStyle::Plain, None).unwrap(),
            "You are a careful tutor.\n\nQuestion: Problem: 2+3?\nAnswer with #### N.\nAnswer:"
        );
        let bad = DataSection {
            prompt_template: Some("{{ question ".into()),
            ..DataSection::default()
        };
        let err = format!("{:#}", PromptFormat::of(&bad, &[]).unwrap_err());
        assert!(err.contains("prompt-template"), "{err}");
    }
}
