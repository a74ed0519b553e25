//! Saying so when an install failed because it had to compile something and
//! the machine has no compiler.
//!
//! Heroku's heroku-24 run image has no `gcc`, `cc` or `make`: a package that
//! ships only source with C extensions (a pip sdist, a native gem, an npm
//! package built with node-gyp, Go with cgo) fails to install there, and the
//! installer's own words bury the reason in pages of build output. Each
//! installer reports a missing compiler in its own way; this recognises
//! those reports and adds one plain sentence with what to do instead.

use super::tools::Language;

/// Programs a native build runs first.
const BUILD_TOOLS: &[&str] = &["gcc", "cc", "g++", "c++", "clang", "clang++", "make", "gmake"];

/// How a shell, a build system or an installer says a program is missing.
const NOT_FOUND: &[&str] =
    &["No such file or directory", "not found", "unable to execute", "executable file not found", "command not found"];

/// Reports that name no program but mean the same.
const WHOLE_REPORTS: &[(&str, &str)] = &[
    ("You have to install development tools first", "a C compiler"),
    ("can't find Rust compiler", "a Rust compiler"),
    ("Unknown compiler(s)", "a C compiler"),
];

/// The sentence to add to a failed install's error output, when that output
/// shows a compiler or build tool was missing.
pub fn note(language: Language, stderr: &str) -> Option<String> {
    let missing = stderr.lines().find_map(missing_tool)?;
    let instead = match language {
        Language::Python => "a version published as a wheel for this platform (manylinux x86_64)",
        Language::Ruby => "a version published as a precompiled gem for this platform (x86_64-linux)",
        Language::Node => "a version with prebuilt binaries, or a pure JavaScript package",
        Language::Go => "a pure Go package (or CGO_ENABLED=0 where the package allows it)",
    };
    Some(format!(
        "This package has to be compiled, and this machine has no {missing} (Heroku's heroku-24 dynos have no \
         compiler at run time). Ask for {instead}, or a package that needs no compiler."
    ))
}

/// The missing tool a line reports, if it reports one.
fn missing_tool(line: &str) -> Option<String> {
    if let Some((_, what)) = WHOLE_REPORTS.iter().find(|(report, _)| line.contains(report)) {
        return Some((*what).to_owned());
    }
    let at = NOT_FOUND.iter().filter_map(|phrase| line.find(phrase)).min()?;
    // `make: cc: No such file…` names the missing one last before the
    // phrase; `Error: not found: make` after it.
    let (before, after) = line.split_at(at);
    let tool = |text: &str, last: bool| {
        let mut words = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || "+_-./".contains(c)))
            .map(|word| word.rsplit('/').next().unwrap_or(word))
            .filter(|word| {
                BUILD_TOOLS.contains(word)
                // Cross-compiler names: x86_64-linux-gnu-gcc.
                || word.ends_with("-gcc")
                || word.ends_with("-g++")
            });
        if last { words.next_back() } else { words.next() }.map(str::to_owned)
    };
    tool(before, true).or_else(|| tool(after, false)).map(|tool| format!("`{tool}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_installers_report_of_a_missing_compiler_gets_the_note() {
        let reports = [
            (Language::Python, "      error: command 'gcc' failed: No such file or directory", "`gcc`"),
            (
                Language::Python,
                "error: command '/usr/bin/x86_64-linux-gnu-gcc' failed: No such file or directory",
                "`x86_64-linux-gnu-gcc`",
            ),
            (Language::Python, "unable to execute 'gcc': No such file or directory", "`gcc`"),
            (Language::Python, "      error: can't find Rust compiler", "a Rust compiler"),
            (Language::Python, "../meson.build:1:0: ERROR: Unknown compiler(s): [['cc'], ['gcc']]", "a C compiler"),
            (Language::Ruby, "make: cc: No such file or directory", "`cc`"),
            (Language::Ruby, "You have to install development tools first.", "a C compiler"),
            (Language::Ruby, "sh: 1: make: not found", "`make`"),
            (Language::Node, "gyp ERR! stack Error: not found: make", "`make`"),
            (Language::Node, "make: g++: No such file or directory", "`g++`"),
            (
                Language::Go,
                "cgo: C compiler \"gcc\" not found: exec: \"gcc\": executable file not found in $PATH",
                "`gcc`",
            ),
        ];
        for (language, line, missing) in reports {
            let stderr = format!("Building wheel...\n{line}\nmore output");
            let note = note(language, &stderr).unwrap_or_else(|| panic!("no note for {line:?}"));
            assert!(note.contains(&format!("no {missing} ")), "{line:?}: {note}");
        }
    }

    #[test]
    fn other_failures_get_no_note() {
        for stderr in [
            "ERROR: No matching distribution found for nosuchpackage",
            "  × No solution found when resolving dependencies",
            "npm ERR! 404 Not Found - GET https://registry.npmjs.org/nosuch - Not found",
            "ERROR:  Could not find a valid gem 'nosuch' (>= 0) in any repository",
            "go: module example.com/nosuch: not found",
            "gcc: fatal error: no input files",
        ] {
            assert_eq!(note(Language::Python, stderr), None, "{stderr}");
        }
    }
}
