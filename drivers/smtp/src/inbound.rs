//! Inbound mail through `IpInterface.listenTcp`: the driver is the SMTP server for peers on
//! the network and delivers each accepted message to the grain's `TcpPort` as one stream.
//!
//! # What the grain receives
//!
//! One connection per message. The stream is the message exactly as received (CRLF line
//! ends, dots un-stuffed), preceded by trace header fields carrying the envelope, then
//! end of stream:
//!
//! ```text
//! X-Capnet-Peer: 192.0.2.7:40312
//! X-Capnet-Envelope-From: <sender@example.net>
//! X-Capnet-Envelope-To: <app@example.org>
//! X-Capnet-Envelope-To: <other@example.org>
//! Subject: ...                 <- the message's own header fields and body follow
//! ```
//!
//! The grain answers on the same connection: a line starting with a 4xx or 5xx code
//! (such as `550 5.7.1 not here`) refuses the message and is passed to the sender;
//! anything else, or closing without a word, accepts it. If the grain says nothing within
//! the timeout, the sender gets 451 and may retry.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use capnet_driver_api::{Connection, EventKind, ListenContext, Listener, TcpListeners};
use futures::future::LocalBoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use crate::options::AddressPattern;
use crate::server::{Envelope, Handler, Reply, SessionLimits, serve};

/// Settings for inbound sessions.
#[derive(Clone)]
pub struct InboundConfig {
    /// The name in greetings.
    pub name: String,
    /// Session limits.
    pub limits: SessionLimits,
    /// Accepted recipient domains (empty: any).
    pub domains: Vec<AddressPattern>,
}

/// The listener the driver returns: accepted messages, one connection each.
pub struct MailListener {
    rx: mpsc::Receiver<Connection>,
    addrs: Vec<SocketAddr>,
    accept_task: AbortHandle,
}

impl Drop for MailListener {
    fn drop(&mut self) {
        // Ends the accept loop; its JoinSet aborts every session in progress.
        self.accept_task.abort();
    }
}

impl Listener for MailListener {
    fn accept(&mut self) -> LocalBoxFuture<'_, std::io::Result<Connection>> {
        Box::pin(async move {
            self.rx.recv().await.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the mail listener stopped")
            })
        })
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }
}

/// Binds the port and serves SMTP on it, delivering messages through the listener.
pub async fn listen(
    cx: ListenContext,
    config: InboundConfig,
) -> Result<MailListener, capnet_driver_api::DriverError> {
    let mut tcp: TcpListeners = cx.bind_tcp().await?;
    let addrs = tcp.local_addrs();
    let (tx, rx) = mpsc::channel(16);
    let cx = Rc::new(cx);
    let task = tokio::task::spawn_local(async move {
        let mut sessions = JoinSet::new();
        loop {
            tokio::select! {
                conn = tcp.accept() => {
                    let Ok(conn) = conn else { continue };
                    let handler = Rc::new(InboundHandler {
                        config: config.clone(),
                        peer: conn.peer.clone(),
                        tx: tx.clone(),
                        cx: cx.clone(),
                    });
                    let limits = config.limits;
                    sessions.spawn_local(async move { serve(conn.stream, handler, limits).await });
                }
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
    });
    Ok(MailListener {
        rx,
        addrs,
        accept_task: task.abort_handle(),
    })
}

struct InboundHandler {
    config: InboundConfig,
    peer: String,
    tx: mpsc::Sender<Connection>,
    cx: Rc<ListenContext>,
}

/// How long the grain has to take and answer one message.
const GRAIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl Handler for InboundHandler {
    fn server_name(&self) -> String {
        self.config.name.clone()
    }

    fn mail_from(&self, _env: &crate::server::Envelope, _size: Option<u64>) -> Result<(), Reply> {
        if self.cx.is_revoked() {
            return Err(Reply::new(421, "4.3.0 the service is no longer available"));
        }
        Ok(())
    }

    fn rcpt_to(&self, _env: &Envelope, rcpt: &str) -> Result<(), Reply> {
        let domains = &self.config.domains;
        if !domains.is_empty() && !domains.iter().any(|d| d.matches(rcpt)) {
            return Err(Reply::new(550, format!("5.7.1 no mail for <{rcpt}> here")));
        }
        Ok(())
    }

    fn message(self: Rc<Self>, env: Envelope, data: Vec<u8>) -> LocalBoxFuture<'static, Reply> {
        Box::pin(async move {
            let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
            let conn = Connection::new(theirs, self.peer.clone());
            if self.tx.send(conn).await.is_err() {
                return Reply::new(451, "4.3.0 the mailbox is not listening any more");
            }
            let mut head = format!(
                "X-Capnet-Peer: {}\r\nX-Capnet-Envelope-From: <{}>\r\n",
                self.peer, env.from
            );
            for r in &env.rcpts {
                head.push_str(&format!("X-Capnet-Envelope-To: <{r}>\r\n"));
            }
            let exchange = async {
                ours.write_all(head.as_bytes()).await?;
                ours.write_all(&data).await?;
                ours.shutdown().await?;
                let mut answer = Vec::new();
                (&mut ours).take(512).read_to_end(&mut answer).await?;
                Ok::<_, std::io::Error>(answer)
            };
            match tokio::time::timeout(GRAIN_ANSWER_TIMEOUT, exchange).await {
                Err(_) => Reply::new(451, "4.3.0 the mailbox did not answer in time; try later"),
                Ok(Err(e)) => Reply::new(
                    451,
                    format!("4.3.0 the mailbox did not take the message: {e}"),
                ),
                Ok(Ok(answer)) => {
                    let text = String::from_utf8_lossy(&answer);
                    let line = text.lines().next().unwrap_or("").trim();
                    let code: Option<u16> = line.get(..3).and_then(|c| c.parse().ok());
                    match code {
                        Some(c) if (400..600).contains(&c) => {
                            let rest = line.get(3..).unwrap_or("").trim();
                            Reply::new(
                                c,
                                if rest.is_empty() {
                                    "refused by the mailbox".to_string()
                                } else {
                                    rest.to_string()
                                },
                            )
                        }
                        _ => Reply::new(250, "2.0.0 delivered"),
                    }
                }
            }
        })
    }

    fn refused(&self, command: &str, reply: &Reply) {
        self.cx.report(
            EventKind::MediationRefused,
            self.peer.clone(),
            format!("inbound smtp {command}: {reply}"),
        );
    }
}
