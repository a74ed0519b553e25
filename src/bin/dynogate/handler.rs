//! Our side of the MCP session: the client's name in `initialize`, and what
//! it does with the server's progress notifications (one line each on a
//! terminal's stderr). Everything else the server may send is rmcp's default.
//!
//! rmcp puts a progress token on every request it sends, so long calls
//! report progress without asking for it here.

use rmcp::ClientHandler;
use rmcp::model::{ClientCapabilities, ClientConfig, Implementation, ProgressNotificationParam};
use rmcp::service::{NotificationContext, RoleClient};

use crate::output;

#[derive(Debug, Clone, Copy)]
pub struct Handler {
    /// Only when stderr is a terminal: a pipe or a log file would be filled
    /// with lines meant for someone watching.
    show_progress: bool,
}

impl Handler {
    pub fn new(show_progress: bool) -> Self {
        Handler { show_progress }
    }
}

impl ClientHandler for Handler {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(ClientCapabilities::default(), Implementation::new("dynogate", env!("CARGO_PKG_VERSION")))
    }

    async fn on_progress(&self, params: ProgressNotificationParam, _context: NotificationContext<RoleClient>) {
        if self.show_progress {
            eprintln!("{}", output::progress_line(params.progress, params.total, params.message.as_deref()));
        }
    }
}
