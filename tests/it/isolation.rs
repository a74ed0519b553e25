use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn two_sessions_are_two_machines_and_one_session_keeps_its_files() {
    let gateway = Gateway::start();
    let http = gateway.http();
    let ((a, _), (b, _)) = tokio::join!(http.initialize(), http.initialize());
    assert_ne!(a, b);
    let (runners_a, runners_b) = (runner_pids(&a), runner_pids(&b));
    assert_eq!(runners_a.len(), 1);
    assert_eq!(runners_b.len(), 1);
    assert_ne!(runners_a, runners_b);

    let code = |c: &str| json!({"code": c});
    let wrote = http
        .call(&a, 1, "code_exec_python", code("open('note.txt','w').write('from a'); import os; print(os.getcwd())"))
        .await;
    let dir_a = exec_result(&wrote.json)["stdout"].as_str().unwrap().to_owned();

    let read_a = http.call(&a, 2, "code_exec_python", code("print(open('note.txt').read())")).await;
    assert_eq!(exec_result(&read_a.json)["stdout"], "from a");

    let read_b = http
        .call(&b, 1, "code_exec_python", code("import os; print(os.getcwd()); print(os.path.exists('note.txt'))"))
        .await;
    let out_b = exec_result(&read_b.json)["stdout"].as_str().unwrap().to_owned();
    let (dir_b, exists) = out_b.split_once('\n').unwrap();
    assert_ne!(dir_b, dir_a);
    assert_eq!(exists, "False");

    // The session directory goes with the session.
    assert_eq!(http.delete(&a).await, reqwest::StatusCode::NO_CONTENT);
    assert!(!std::path::Path::new(&dir_a).exists(), "{dir_a} outlived its session");
    let still_b = http.call(&b, 2, "code_exec_python", code("print('b lives')")).await;
    assert_eq!(exec_result(&still_b.json)["stdout"], "b lives");
}
