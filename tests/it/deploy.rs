//! The Heroku Button's files, checked without Heroku: `app.json`'s stack,
//! buildpacks (quick runtimes first, the long Rust compile last) and
//! documented config vars, and the files each buildpack detects.

use std::path::Path;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn app_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("app.json")).unwrap()).expect("app.json is JSON")
}

#[test]
fn app_json_pins_the_stack_and_orders_the_buildpacks() {
    let app = app_json();
    assert_eq!(app["stack"], "heroku-24");
    let urls: Vec<&str> = app["buildpacks"].as_array().unwrap().iter().map(|b| b["url"].as_str().unwrap()).collect();
    assert_eq!(
        urls,
        ["heroku/python", "heroku/nodejs", "heroku/ruby", "heroku/go", "https://github.com/emk/heroku-buildpack-rust"]
    );
    assert_eq!(app["env"]["GO_INSTALL_TOOLS_IN_IMAGE"]["value"], "true");
    for key in ["name", "description", "repository", "success_url", "env", "formation"] {
        assert!(app.get(key).is_some(), "app.json lacks {key}");
    }
}

#[test]
fn every_config_var_of_app_json_is_described_and_in_the_readme() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for (name, entry) in app_json()["env"].as_object().unwrap() {
        let description = entry["description"].as_str().unwrap_or_default();
        assert!(description.len() > 20, "{name} has no real description");
        assert!(readme.contains(&format!("`{name}`")), "{name} is not in the README");
    }
}

#[test]
fn each_buildpack_finds_the_file_it_detects() {
    for file in ["requirements.txt", "package.json", "Gemfile", "Gemfile.lock", "go.mod", "RustConfig"] {
        assert!(root().join(file).is_file(), "{file} is missing");
    }
    // pyenv would read it on developers' machines and switch their python3.
    assert!(!root().join(".python-version").exists());
    let requirements = std::fs::read_to_string(root().join("requirements.txt")).unwrap();
    assert!(requirements.lines().any(|l| l.starts_with("uv==")), "requirements.txt brings uv");
    let package: Value = serde_json::from_str(&std::fs::read_to_string(root().join("package.json")).unwrap()).unwrap();
    assert!(package["engines"]["node"].is_string() && package.get("dependencies").is_none());
    let procfile = std::fs::read_to_string(root().join("Procfile")).unwrap();
    assert!(procfile.lines().any(|l| l.starts_with("web: ")));
    assert!(procfile.lines().any(|l| l.starts_with("mcp-")), "an mcp-* process type for the executor");
}
