//! The executor's tools as MCP sees them: one per language, with the names,
//! argument schema and result shape of Heroku's `mcp-code-exec-*` templates.

use std::sync::Arc;

use dynogate_shared::timing::{self, Timing};
use rmcp::model::{CallToolResult, ContentBlock, JsonObject, MetaObject, Tool};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A language the executor can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    Python,
    Node,
    Ruby,
    Go,
}

impl Language {
    pub const ALL: [Language; 4] = [Language::Python, Language::Node, Language::Ruby, Language::Go];

    pub fn tool_name(self) -> &'static str {
        match self {
            Language::Python => "code_exec_python",
            Language::Node => "code_exec_node",
            Language::Ruby => "code_exec_ruby",
            Language::Go => "code_exec_go",
        }
    }

    /// Its name in metrics (one of [`dynogate_shared::timing::LANGUAGES`]).
    pub fn label(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Node => "node",
            Language::Ruby => "ruby",
            Language::Go => "go",
        }
    }

    pub fn from_tool(name: &str) -> Option<Language> {
        Language::ALL.into_iter().find(|language| language.tool_name() == name)
    }

    /// What the tool does, for the model that calls it.
    fn description(self) -> &'static str {
        match self {
            Language::Python => {
                "Runs a Python snippet with `python3 -c` and reports its exit code and output.\n\n\
                 Packages listed in `packages` are installed with pip into this session's own virtual \
                 environment first."
            }
            Language::Node => {
                "Runs a JavaScript snippet with Node.js (`node -e`; CommonJS `require` and ES module \
                 `import` both work) and reports its exit code and output.\n\n\
                 Packages listed in `packages` are installed with npm into this session's own \
                 `node_modules` first."
            }
            Language::Ruby => {
                "Runs a Ruby script and reports its exit code and output.\n\n\
                 Gems listed in `packages` are installed with `gem install` into this session's own \
                 GEM_HOME first; `require` them as usual."
            }
            Language::Go => {
                "Compiles and runs a Go program (a complete `package main` with `func main()`) and \
                 reports its exit code and output; compile errors come back in stderr.\n\n\
                 Modules listed in `packages` are added with `go get` to this session's own module first."
            }
        }
    }

    fn code_description(self) -> &'static str {
        match self {
            Language::Python => "The Python code to execute as a string.",
            Language::Node => "The JavaScript code to execute as a string.",
            Language::Ruby => "The Ruby code to execute as a string.",
            Language::Go => "The Go code to execute as a string.",
        }
    }

    fn packages_description(self) -> &'static str {
        match self {
            Language::Python => "Optional list of pip package names to install before execution.",
            Language::Node => "Optional list of npm package names to install before execution.",
            Language::Ruby => "Optional list of gem names to install before execution.",
            Language::Go => "Optional list of Go module paths to install (go get) before execution.",
        }
    }

    /// The tool as `tools/list` shows it.
    pub fn tool(self) -> Tool {
        let description = format!(
            "{}\n\nThe code runs in this session's private working directory: files it writes stay there \
             for later calls in the same session and are deleted when the session ends. A non-zero \
             returncode means the code failed and should be fixed.\n\n\
             Returns JSON with `returncode`, `stdout` and `stderr`.",
            self.description()
        );
        Tool::new(self.tool_name(), description, input_schema(self)).with_raw_output_schema(output_schema(self))
    }
}

/// The arguments every code tool takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeArgs {
    pub code: String,
    #[serde(default)]
    pub packages: Option<Vec<String>>,
}

/// What a tool call returns, in the templates' field order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecResult {
    pub returncode: i32,
    pub stdout: String,
    pub stderr: String,
}

impl ExecResult {
    /// The templates' answer when the code ran out of time.
    pub fn timed_out() -> ExecResult {
        ExecResult { returncode: -2, stdout: String::new(), stderr: "Error: Execution timed out".into() }
    }
}

/// The template's input schema for a code tool.
fn input_schema(language: Language) -> Arc<JsonObject> {
    let schema = json!({
        "type": "object",
        "title": format!("{}Arguments", language.tool_name()),
        "required": ["code"],
        "properties": {
            "code": {"type": "string", "title": "Code", "description": language.code_description()},
            "packages": {
                "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                "default": null,
                "title": "Packages",
                "description": language.packages_description()
            }
        }
    });
    Arc::new(schema.as_object().expect("a JSON object").clone())
}

/// The template's output schema: `{result: object}`.
fn output_schema(language: Language) -> Arc<JsonObject> {
    let schema = json!({
        "type": "object",
        "title": format!("{}Output", language.tool_name()),
        "required": ["result"],
        "properties": {"result": {"type": "object", "title": "Result", "additionalProperties": true}}
    });
    Arc::new(schema.as_object().expect("a JSON object").clone())
}

/// A result as the templates return it: pretty JSON text plus `structuredContent.result`.
pub fn success(result: &ExecResult, timing: &Timing) -> CallToolResult {
    let text = serde_json::to_string_pretty(result).expect("plain structs serialize");
    let mut out = CallToolResult::success(vec![ContentBlock::text(text)]);
    out.structured_content = Some(json!({ "result": result }));
    let mut meta = JsonObject::new();
    meta.insert(timing::META_KEY.into(), serde_json::to_value(timing).expect("plain structs serialize"));
    out.meta = Some(MetaObject(meta));
    out
}

/// A tool-level error the calling model can read and act on.
pub fn failure(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_pretty_json_in_the_templates_field_order() {
        let timing = Timing { language: "python".into(), install_seconds: None, run_seconds: Some(0.5) };
        let result = success(&ExecResult { returncode: 3, stdout: "1".into(), stderr: String::new() }, &timing);
        let value = serde_json::to_value(&result).unwrap();
        assert_eq!(Timing::from_answer(&serde_json::to_vec(&json!({"result": value})).unwrap()), Some(timing));
        assert_eq!(value["content"][0]["text"], "{\n  \"returncode\": 3,\n  \"stdout\": \"1\",\n  \"stderr\": \"\"\n}");
        assert_eq!(value["structuredContent"]["result"]["returncode"], 3);
        assert_eq!(value["isError"], false);
    }

    #[test]
    fn every_schema_matches_the_templates_shape() {
        for language in Language::ALL {
            let tool = language.tool();
            assert_eq!(Language::from_tool(&tool.name), Some(language));
            let schema = serde_json::to_value(&*tool.input_schema).unwrap();
            assert_eq!(schema["required"], json!(["code"]));
            assert_eq!(schema["properties"]["packages"]["anyOf"][0]["type"], "array");
            assert_eq!(schema["properties"]["packages"]["default"], serde_json::Value::Null);
            assert_eq!(schema["title"], format!("{}Arguments", language.tool_name()));
            let output = serde_json::to_value(tool.output_schema.as_deref().unwrap()).unwrap();
            assert_eq!(output["required"], json!(["result"]));
        }
        assert_eq!(Language::from_tool("code_exec_cobol"), None);
    }
}
