use serde_json::json;

use crate::browser::Browser;
use crate::support::*;

const KEY: &str = "status-page-key-0123456789";

/// The page in headless Chromium: it asks for the key, lists a live session
/// with its calls and runner, shows a client's error, and drops the session
/// once it is deleted; the key is never in the URL, a cookie or storage.
#[tokio::test]
async fn the_status_page_lists_a_live_session_and_shows_it_gone_after_delete() {
    let gateway = Gateway::with(Options::default().api_key(KEY));
    let http = gateway.http();
    let (session, _) = http.initialize().await;
    let ran = http.call(&session, 2, "code_exec_python", json!({"code": "print(6 * 7)"})).await;
    assert_eq!(exec_result(&ran.json)["stdout"], "42", "{}", ran.text);
    // An error a client was sent, for the page's list.
    let unknown = http.call("0123456789abcdef0123456789abcdef", 9, "echo", json!({})).await;
    assert_eq!(unknown.error_code(), -32001);
    let short = &session[..8];
    let row = format!("document.querySelector('tr[data-session=\"{short}\"]')");

    let mut browser = Browser::start().await;
    let page = format!("{}/status", gateway.url);
    browser.navigate(&page).await;
    assert_eq!(browser.eval("document.getElementById('status').hidden").await, json!(true), "no data before the key");

    // A wrong key is refused, and the form stays.
    browser.eval("document.getElementById('key').focus()").await;
    browser.type_text("not-the-key").await;
    browser.press_enter().await;
    browser
        .wait_for("a wrong key is refused", "document.getElementById('form-error').textContent.includes('refused')")
        .await;

    browser.eval("document.getElementById('key').focus()").await;
    browser.type_text(KEY).await;
    browser.press_enter().await;
    browser.wait_for("the session is listed", &format!("!!{row}")).await;
    let form = browser.eval("getComputedStyle(document.getElementById('key-form')).display").await;
    assert_eq!(form, json!("none"), "the key form is out of the way");
    let cells = browser.eval(&format!("[...{row}.cells].map(c => c.textContent)")).await;
    let cells: Vec<&str> = cells.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(cells[..3], [short, "client", "ready"], "{cells:?}");
    assert_eq!(cells[4], "1", "one call answered: {cells:?}");
    assert!(cells[8].starts_with("pid "), "the runner: {cells:?}");
    let errors = browser.eval("document.getElementById('errors').innerText").await;
    assert!(errors.as_str().unwrap().contains("-32001"), "{errors}");
    browser.screenshot("status-page-live-session").await;

    // The key lives in the page's memory only.
    let href = browser.eval("location.href").await;
    assert_eq!(href.as_str().unwrap().trim_end_matches('?'), page, "nothing added to the URL");
    let stored = browser.eval("document.cookie + localStorage.length + '/' + sessionStorage.length").await;
    assert_eq!(stored, json!("0/0"), "no cookie and no storage");
    let field = browser.eval("document.getElementById('key').value").await;
    assert_eq!(field, json!(""), "the field is emptied once read");

    assert_eq!(http.delete(&session).await, reqwest::StatusCode::NO_CONTENT);
    browser.wait_for("the session is gone from the page", &format!("!{row}")).await;
    browser.wait_for("the list says so", "!document.getElementById('no-sessions').hidden").await;
    browser.screenshot("status-page-after-delete").await;
}

/// The page's data needs the key, the page itself does not, and the page
/// may run nothing but its own script.
#[tokio::test]
async fn the_status_data_needs_the_key_and_the_page_is_locked_down() {
    let gateway = Gateway::with(Options::default().api_key(KEY));
    let client = reqwest::Client::new();
    let data = client.get(format!("{}/v1/status", gateway.url)).send().await.unwrap();
    assert_eq!(data.status(), 401);
    let data = client.get(format!("{}/v1/status", gateway.url)).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(data.status(), 200);
    let body: serde_json::Value = data.json().await.unwrap();
    assert_eq!(body["gateway"]["spawner"], "local");
    assert_eq!(body["sessions"], json!([]));
    let page = client.get(format!("{}/status", gateway.url)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(!html.contains(KEY) && html.contains("id=\"key\""), "{html}");
    assert!(!html.contains("name=\"key\""), "the key field has no name, so no form submission carries it");
}
