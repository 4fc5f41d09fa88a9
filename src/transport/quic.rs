//! QUIC endpoint with mutual TLS: frames between vnodes, one-way or
//! request/response, over cached connections to CA-certified peers.
//!
//! Wire: each frame travels alone on its own stream: a one-way frame on a
//! unidirectional stream, a request and its reply on the two halves of a
//! bidirectional one. The stream's end delimits the frame (read with
//! `read_to_end(max_frame)`), so there is no length prefix to trust, and a
//! frame over `max_frame` is refused by stopping its stream without
//! touching the connection. Frames are not ordered with respect to each
//! other, not even two sends awaited one after the other: each stream is
//! read by its own task. A caller that needs order numbers its frames or
//! uses requests.

use super::cert::{self, SERVER_NAME};
use super::error::{SendError, TransportError};
use super::identity::{Identity, PeerInfo};
use crate::id::NodeId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ReadError, ReadToEndError, RecvStream, SendStream, VarInt, WriteError};
use serde::{Deserialize, Serialize};
use smol::channel::{Receiver, Sender};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tracing::{debug, warn};

/// ALPN of the capy wire protocol; a peer speaking anything else fails the
/// handshake.
pub const ALPN: &[u8] = b"capy/1";

/// Connection close codes (QUIC application error codes).
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_BAD_ID: u32 = 1;
const CLOSE_BAD_CERT: u32 = 2;
const CLOSE_EVICTED: u32 = 3;
const CLOSE_SELF: u32 = 4;

/// Stream stop/reset codes: why a frame was refused.
const STREAM_TOO_LARGE: u32 = 1;
const STREAM_BAD_FRAME: u32 = 2;
const STREAM_TIMEOUT: u32 = 3;
const STREAM_NO_REPLY: u32 = 4;
const STREAM_SHUTDOWN: u32 = 5;

fn stream_code_text(code: u64) -> String {
    match code {
        1 => "frame too large".into(),
        2 => "bad frame".into(),
        3 => "frame not complete in time".into(),
        4 => "no reply: the receiver dropped the request".into(),
        5 => "receiver is shutting down".into(),
        c => format!("stream code {c}"),
    }
}

/// One message between two vnodes. `from` must be a vnode id the sending
/// node's certificate grants; the receiver checks it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub from: NodeId,
    pub to: NodeId,
    #[serde(with = "body_bytes")]
    pub body: Vec<u8>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Frame({} -> {}, {} bytes)",
            self.from.short(),
            self.to.short(),
            self.body.len()
        )
    }
}

impl Frame {
    /// postcard: `from` and `to` as varint u128, `body` as varint length +
    /// bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain integers and bytes into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes exactly one frame; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Frame, String> {
        let (frame, rest) =
            postcard::take_from_bytes::<Frame>(bytes).map_err(|e| format!("bad frame: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{} trailing bytes after the frame", rest.len()));
        }
        Ok(frame)
    }
}

/// The body as one byte string (one copy) rather than a sequence of u8.
mod body_bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Knobs of the transport. Defaults suit a LAN of gateways.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Largest encoded frame sent or accepted, bytes.
    pub max_frame: usize,
    /// Connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// One send (until the peer acknowledged it) or one request (until the
    /// reply is read).
    pub request_timeout: Duration,
    /// A connection silent this long is dropped.
    pub idle_timeout: Duration,
    /// Ping interval on idle connections; below `idle_timeout`.
    pub keep_alive: Duration,
    /// Cached connections; the least recently used is closed beyond it.
    /// New inbound handshakes are refused while twice as many are open.
    pub max_connections: usize,
    /// Received frames waiting for the node; when full, streams wait.
    pub incoming_queue: usize,
    /// Concurrent streams a peer may open per connection, each direction.
    pub max_streams: u32,
    /// Frames being read at once over all connections: with `max_frame`,
    /// the bound on memory in partly read frames.
    pub max_concurrent_reads: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_frame: 8 << 20,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
            max_connections: 256,
            incoming_queue: 1024,
            max_streams: 64,
            max_concurrent_reads: 32,
        }
    }
}

impl TransportConfig {
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("max_frame", self.max_frame),
            ("max_connections", self.max_connections),
            ("incoming_queue", self.incoming_queue),
            ("max_streams", self.max_streams as usize),
            ("max_concurrent_reads", self.max_concurrent_reads),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("keep_alive", self.keep_alive),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.keep_alive >= self.idle_timeout {
            return Err("keep_alive must be shorter than idle_timeout".into());
        }
        Ok(())
    }
}

/// A frame that arrived from a verified peer. `reply` is set for requests:
/// answer through it (dropping it tells the requester there is no reply).
pub struct Received {
    pub peer: Arc<PeerInfo>,
    pub frame: Frame,
    pub reply: Option<Responder>,
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Received({:?} from {:?}, request: {})",
            self.frame,
            self.peer,
            self.reply.is_some()
        )
    }
}

/// Frames received by a [`Transport`]; ends when the transport closes.
pub type Incoming = Receiver<Received>;

/// The reply half of a request.
pub struct Responder {
    send: Option<SendStream>,
    addr: SocketAddr,
    max_frame: usize,
    timeout: Duration,
}

impl Responder {
    /// Sends the reply; returns once it is handed to QUIC.
    pub async fn send(mut self, frame: Frame) -> Result<(), SendError> {
        let addr = self.addr;
        let Some(mut s) = self.send.take() else {
            return Err(SendError::Closed);
        };
        let bytes = frame.encode();
        if bytes.len() > self.max_frame {
            let _ = s.reset(VarInt::from_u32(STREAM_TOO_LARGE));
            return Err(SendError::TooLarge {
                size: bytes.len(),
                max: self.max_frame,
            });
        }
        match timeout(self.timeout, s.write_all(&bytes)).await {
            None => {
                let _ = s.reset(VarInt::from_u32(STREAM_TIMEOUT));
                Err(SendError::Timeout {
                    addr,
                    what: "writing a reply",
                })
            }
            Some(Err(e)) => Err(write_err(addr, e)),
            Some(Ok(())) => {
                let _ = s.finish();
                Ok(())
            }
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(mut s) = self.send.take() {
            let _ = s.reset(VarInt::from_u32(STREAM_NO_REPLY));
        }
    }
}

/// A node's QUIC endpoint. Cheap to clone; the endpoint closes when
/// [`Transport::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Transport {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close();
    }
}

struct Shared {
    endpoint: quinn::Endpoint,
    local: SocketAddr,
    local_spki: Vec<u8>,
    cfg: TransportConfig,
    slots: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
    clock: AtomicU64,
    tx: Sender<Received>,
    reads: smol::lock::Semaphore,
    closed: AtomicBool,
}

/// The cached connection to one address. The async lock makes concurrent
/// senders to a new peer share one handshake.
struct Slot {
    state: smol::lock::Mutex<SlotState>,
    last_used: AtomicU64,
}

#[derive(Default)]
struct SlotState {
    live: Option<Live>,
    /// Removed from the cache; a waiter must look the address up again.
    evicted: bool,
}

#[derive(Clone)]
struct Live {
    conn: Connection,
    peer: Arc<PeerInfo>,
}

impl Transport {
    /// Binds a UDP socket on `listen` and starts accepting connections from
    /// peers certified by the identity's CA.
    pub fn bind(
        identity: &Identity,
        listen: SocketAddr,
        cfg: TransportConfig,
    ) -> Result<(Transport, Incoming), TransportError> {
        cfg.check().map_err(TransportError::Config)?;
        let tls = |e: rustls::Error| TransportError::Tls(e.to_string());
        let provider = cert::provider();
        let roots = cert::roots(&identity.ca).map_err(TransportError::Tls)?;

        let mut tc = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(cfg.idle_timeout)
            .map_err(|e| TransportError::Config(format!("idle_timeout: {e}")))?;
        tc.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(cfg.keep_alive))
            .max_concurrent_uni_streams(VarInt::from_u32(cfg.max_streams))
            .max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_streams))
            .datagram_receive_buffer_size(None)
            .ack_frequency_config(Some(ack_frequency()));
        let tc = Arc::new(tc);

        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
            .map_err(tls)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        // Every connection presents and verifies a full certificate: no
        // resumption that would skip the check.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let server =
            QuicServerConfig::try_from(server).map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(tc.clone());

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())
            .map_err(tls)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        let client =
            QuicClientConfig::try_from(client).map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(tc);

        let socket = std::net::UdpSocket::bind(listen).map_err(|source| TransportError::Bind {
            addr: listen,
            source,
        })?;
        let mut ep_cfg = quinn::EndpointConfig::new(Arc::new(ResetKey::for_identity(identity)?));
        ep_cfg.cid_generator(|| Box::new(RandomCids));
        let mut endpoint =
            quinn::Endpoint::new(ep_cfg, Some(server), socket, Arc::new(quinn::SmolRuntime))
                .map_err(|source| TransportError::Bind {
                    addr: listen,
                    source,
                })?;
        endpoint.set_default_client_config(client);
        let local = endpoint
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: listen,
                source,
            })?;

        let (tx, rx) = smol::channel::bounded(cfg.incoming_queue);
        let shared = Arc::new(Shared {
            endpoint,
            local,
            local_spki: identity.spki().to_vec(),
            reads: smol::lock::Semaphore::new(cfg.max_concurrent_reads),
            cfg,
            slots: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            tx,
            closed: AtomicBool::new(false),
        });
        smol::spawn(accept_loop(shared.clone())).detach();
        let t = Transport {
            handle: Arc::new(Handle { shared }),
        };
        Ok((t, rx))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.handle.shared.local
    }

    /// One-way frame. Returns once the peer's QUIC stack acknowledged the
    /// whole frame (not that the node processed it), so a lost or refused
    /// frame is reported. Reuses the cached connection to `to`; a cached
    /// connection found dead is replaced once. With `expect`, refuses a
    /// peer whose certificate does not grant that id.
    pub async fn send(
        &self,
        to: SocketAddr,
        expect: Option<NodeId>,
        frame: Frame,
    ) -> Result<(), SendError> {
        let s = &self.handle.shared;
        let bytes = s.encode_checked(&frame)?;
        s.with_conn(to, expect, |live| s.send_on(live, &bytes))
            .await
    }

    /// Request on a bidirectional stream; the reply must come from a vnode
    /// id the peer owns, within `request_timeout`.
    pub async fn request(
        &self,
        to: SocketAddr,
        expect: Option<NodeId>,
        frame: Frame,
    ) -> Result<Frame, SendError> {
        let s = &self.handle.shared;
        let bytes = s.encode_checked(&frame)?;
        s.with_conn(to, expect, |live| s.request_on(live, &bytes))
            .await
    }

    /// Connects (or reuses the connection) and returns who is there: how a
    /// joiner learns a bootstrap peer's vnode ids from its address. Our
    /// certificate has not necessarily been accepted yet when this returns
    /// (TLS 1.3 lets the client finish first); a refusal shows on the next
    /// send or request.
    pub async fn peer_info(&self, to: SocketAddr) -> Result<Arc<PeerInfo>, SendError> {
        let (live, _) = self.handle.shared.conn(to).await?;
        Ok(live.peer)
    }

    /// Number of cached live connections.
    pub fn connections(&self) -> usize {
        self.handle.shared.live_count()
    }

    /// Closes every connection and the endpoint; `Incoming` ends and later
    /// sends fail with [`SendError::Closed`].
    pub fn close(&self) {
        self.handle.shared.close();
    }
}

/// Stateless-reset key derived from the node's private key, so it survives
/// a restart: a node that crashed and came back answers packets of its old
/// connections with a reset the peer recognises, and the peer reconnects
/// at once instead of waiting out the idle timeout.
struct ResetKey(hmac::Hmac<sha2::Sha256>);

impl ResetKey {
    fn for_identity(identity: &Identity) -> Result<ResetKey, TransportError> {
        use hmac::Mac;
        use sha2::Digest;
        let secret = match &identity.key {
            rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der(),
            rustls::pki_types::PrivateKeyDer::Sec1(k) => k.secret_sec1_der(),
            rustls::pki_types::PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der(),
            _ => return Err(TransportError::Tls("unsupported private key type".into())),
        };
        let mut h = sha2::Sha256::new();
        h.update(b"capy stateless reset v1\0");
        h.update(secret);
        let mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&h.finalize())
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        Ok(ResetKey(mac))
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], out: &mut [u8]) {
        use hmac::Mac;
        let mut m = self.0.clone();
        m.update(data);
        let tag = m.finalize().into_bytes();
        let n = out.len().min(tag.len());
        out[..n].copy_from_slice(&tag[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        use hmac::Mac;
        let mut m = self.0.clone();
        m.update(data);
        m.verify_slice(signature)
            .map_err(|_| quinn::crypto::CryptoError)
    }
}

/// Random 8-byte connection ids that any restart of this node accepts as
/// possibly its own. quinn's default generator signs its ids with a key
/// that changes on restart and silently drops packets for ids it cannot
/// verify, which would keep a restarted node from sending the reset above.
/// Resets stay rate-limited and smaller than the packet that caused them.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }
    fn cid_len(&self) -> usize {
        8
    }
    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Asks the peer to acknowledge within 1 ms instead of QUIC's default
/// 25 ms: `send` waits for that acknowledgement, so this is its latency on
/// a quiet connection. Bulk transfers still get one ACK per two packets.
fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut c = quinn::AckFrequencyConfig::default();
    c.max_ack_delay(Some(Duration::from_millis(1)));
    c
}

/// `Some(output)` if `f` finishes within `d`.
async fn timeout<T>(d: Duration, f: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(f.await) }, async {
        smol::Timer::after(d).await;
        None
    })
    .await
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn lost(addr: SocketAddr, e: quinn::ConnectionError) -> SendError {
    SendError::ConnectionLost {
        addr,
        reason: e.to_string(),
    }
}

fn write_err(addr: SocketAddr, e: WriteError) -> SendError {
    match e {
        WriteError::Stopped(code) => SendError::Refused {
            addr,
            reason: stream_code_text(code.into_inner()),
        },
        WriteError::ConnectionLost(e) => lost(addr, e),
        other => SendError::Stream {
            addr,
            reason: other.to_string(),
        },
    }
}

fn read_err(addr: SocketAddr, e: ReadToEndError, max: usize) -> SendError {
    match e {
        ReadToEndError::TooLong => SendError::BadReply {
            addr,
            reason: format!("reply over {max} bytes"),
        },
        ReadToEndError::Read(ReadError::Reset(code)) => SendError::Refused {
            addr,
            reason: stream_code_text(code.into_inner()),
        },
        ReadToEndError::Read(ReadError::ConnectionLost(e)) => lost(addr, e),
        ReadToEndError::Read(other) => SendError::Stream {
            addr,
            reason: other.to_string(),
        },
    }
}

impl Shared {
    fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
        self.tx.close();
        let slots: Vec<_> = lock(&self.slots).drain().map(|(_, s)| s).collect();
        for s in slots {
            if let Some(mut st) = s.state.try_lock() {
                st.evicted = true;
                st.live = None;
            }
        }
    }

    fn live_count(&self) -> usize {
        lock(&self.slots)
            .values()
            .filter(|s| {
                s.state.try_lock().is_some_and(|st| {
                    st.live
                        .as_ref()
                        .is_some_and(|l| l.conn.close_reason().is_none())
                })
            })
            .count()
    }

    fn encode_checked(&self, frame: &Frame) -> Result<Vec<u8>, SendError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(SendError::Closed);
        }
        let bytes = frame.encode();
        if bytes.len() > self.cfg.max_frame {
            return Err(SendError::TooLarge {
                size: bytes.len(),
                max: self.cfg.max_frame,
            });
        }
        Ok(bytes)
    }

    /// True for our own address, including loopback when bound to the
    /// unspecified address. Catching it here saves a handshake with
    /// ourselves; the key check after the handshake catches the rest.
    fn is_self(&self, to: SocketAddr) -> bool {
        to == self.local
            || (to.port() == self.local.port()
                && self.local.ip().is_unspecified()
                && (to.ip().is_loopback() || to.ip().is_unspecified()))
    }

    /// Runs `op` on the connection to `to`; if a cached connection turns
    /// out dead, reconnects once and runs it again.
    async fn with_conn<T, F, Fut>(
        self: &Arc<Self>,
        to: SocketAddr,
        expect: Option<NodeId>,
        op: F,
    ) -> Result<T, SendError>
    where
        F: Fn(Live) -> Fut,
        Fut: Future<Output = Result<T, SendError>>,
    {
        let (live, fresh) = self.conn(to).await?;
        check_expect(&live, expect)?;
        match op(live.clone()).await {
            Err(e @ SendError::ConnectionLost { .. }) => {
                if let Some(refusal) = handshake_refusal(&live, fresh) {
                    return Err(refusal);
                }
                if fresh {
                    return Err(e);
                }
                debug!(peer = %to, reason = %e, "cached connection lost; reconnecting once");
                live.conn
                    .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"connection lost");
                let (live, _) = self.conn(to).await?;
                check_expect(&live, expect)?;
                match op(live.clone()).await {
                    Err(e @ SendError::ConnectionLost { .. }) => {
                        Err(handshake_refusal(&live, true).unwrap_or(e))
                    }
                    r => r,
                }
            }
            r => r,
        }
    }

    /// The cached live connection to `to`, or a new one; `true` when new.
    async fn conn(self: &Arc<Self>, to: SocketAddr) -> Result<(Live, bool), SendError> {
        if self.is_self(to) {
            return Err(SendError::SelfAddress(to));
        }
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(SendError::Closed);
            }
            let slot = self.slot(to);
            let mut st = slot.state.lock().await;
            if st.evicted {
                continue;
            }
            if let Some(l) = &st.live {
                if l.conn.close_reason().is_none() {
                    return Ok((l.clone(), false));
                }
            }
            st.live = None;
            let live = self.connect(to).await?;
            st.live = Some(live.clone());
            return Ok((live, true));
        }
    }

    /// The cache slot of `addr`, made (evicting the least recently used
    /// idle slot when full) if needed.
    fn slot(&self, addr: SocketAddr) -> Arc<Slot> {
        let t = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut map = lock(&self.slots);
        if let Some(s) = map.get(&addr) {
            s.last_used.store(t, Ordering::Relaxed);
            return s.clone();
        }
        if map.len() >= self.cfg.max_connections {
            evict_one(&mut map);
        }
        let s = Arc::new(Slot {
            state: smol::lock::Mutex::new(SlotState::default()),
            last_used: AtomicU64::new(t),
        });
        map.insert(addr, s.clone());
        s
    }

    async fn connect(self: &Arc<Self>, addr: SocketAddr) -> Result<Live, SendError> {
        let connecting =
            self.endpoint
                .connect(addr, SERVER_NAME)
                .map_err(|e| SendError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
        let conn = match timeout(self.cfg.connect_timeout, connecting).await {
            None => {
                warn!(peer = %addr, "connect timed out");
                return Err(SendError::Timeout {
                    addr,
                    what: "connecting",
                });
            }
            Some(Err(e)) => {
                warn!(peer = %addr, reason = %e, "outbound connection refused");
                return Err(SendError::Connect {
                    addr,
                    reason: e.to_string(),
                });
            }
            Some(Ok(c)) => c,
        };
        let peer = match peer_of(&conn) {
            Ok(p) => p,
            Err(reason) => {
                warn!(peer = %addr, %reason, "peer certificate unusable; closing");
                conn.close(VarInt::from_u32(CLOSE_BAD_CERT), b"bad certificate");
                return Err(SendError::Connect { addr, reason });
            }
        };
        if peer.spki == self.local_spki {
            conn.close(VarInt::from_u32(CLOSE_SELF), b"self");
            return Err(SendError::SelfAddress(addr));
        }
        let live = Live {
            conn,
            peer: Arc::new(peer),
        };
        self.serve(live.clone());
        Ok(live)
    }

    /// Handshake of an inbound connection, then serve it and offer it to
    /// the cache so replies to that peer reuse it.
    async fn accept_one(self: Arc<Self>, incoming: quinn::Incoming) {
        let addr = incoming.remote_address();
        let handshake = async {
            match incoming.accept() {
                Ok(connecting) => connecting.await,
                Err(e) => Err(e),
            }
        };
        let conn = match timeout(self.cfg.connect_timeout, handshake).await {
            None => {
                warn!(peer = %addr, "inbound handshake timed out");
                return;
            }
            Some(Err(e)) => {
                warn!(peer = %addr, reason = %e, "inbound connection refused");
                return;
            }
            Some(Ok(c)) => c,
        };
        let peer = match peer_of(&conn) {
            Ok(p) => p,
            Err(reason) => {
                warn!(peer = %addr, %reason, "peer certificate unusable; closing");
                conn.close(VarInt::from_u32(CLOSE_BAD_CERT), b"bad certificate");
                return;
            }
        };
        if peer.spki == self.local_spki {
            conn.close(VarInt::from_u32(CLOSE_SELF), b"self");
            return;
        }
        let live = Live {
            conn,
            peer: Arc::new(peer),
        };
        self.serve(live.clone());
        let slot = self.slot(addr);
        if let Some(mut st) = slot.state.try_lock() {
            let dead = st
                .live
                .as_ref()
                .is_none_or(|l| l.conn.close_reason().is_some());
            if !st.evicted && dead {
                st.live = Some(live);
            }
        };
    }

    /// Accepts the peer's streams on `live` until the connection ends.
    fn serve(self: &Arc<Self>, live: Live) {
        let (s, l) = (self.clone(), live.clone());
        smol::spawn(async move {
            while let Ok(recv) = l.conn.accept_uni().await {
                let (s, l) = (s.clone(), l.clone());
                smol::spawn(async move { s.on_uni(l, recv).await }).detach();
            }
        })
        .detach();
        let s = self.clone();
        smol::spawn(async move {
            while let Ok((send, recv)) = live.conn.accept_bi().await {
                let (s, l) = (s.clone(), live.clone());
                smol::spawn(async move { s.on_bi(l, send, recv).await }).detach();
            }
        })
        .detach();
    }

    /// Reads and checks one inbound frame; on refusal returns the stream
    /// code to stop the stream with.
    async fn read_frame(&self, live: &Live, recv: &mut RecvStream) -> Result<Frame, u32> {
        let addr = live.peer.addr;
        let max = self.cfg.max_frame;
        let read = async {
            let _permit = self.reads.acquire().await;
            recv.read_to_end(max).await
        };
        let bytes = match timeout(self.cfg.request_timeout, read).await {
            None => {
                warn!(peer = %addr, "frame not complete in time; dropped");
                return Err(STREAM_TIMEOUT);
            }
            Some(Err(ReadToEndError::TooLong)) => {
                warn!(peer = %addr, max, "frame over the size limit refused");
                return Err(STREAM_TOO_LARGE);
            }
            Some(Err(ReadToEndError::Read(e))) => {
                debug!(peer = %addr, reason = %e, "inbound stream failed");
                return Err(STREAM_BAD_FRAME);
            }
            Some(Ok(b)) => b,
        };
        let frame = Frame::decode(&bytes).map_err(|reason| {
            warn!(peer = %addr, %reason, "undecodable frame dropped");
            STREAM_BAD_FRAME
        })?;
        if !live.peer.owns(frame.from) {
            warn!(
                peer = %addr,
                name = %live.peer.name,
                claimed = %frame.from,
                max_vnodes = live.peer.max_vnodes,
                "peer claims a vnode id its certificate does not grant; closing the connection"
            );
            live.conn
                .close(VarInt::from_u32(CLOSE_BAD_ID), b"vnode id not granted");
            return Err(STREAM_BAD_FRAME);
        }
        Ok(frame)
    }

    async fn on_uni(&self, live: Live, mut recv: RecvStream) {
        match self.read_frame(&live, &mut recv).await {
            Ok(frame) => {
                let r = Received {
                    peer: live.peer.clone(),
                    frame,
                    reply: None,
                };
                let _ = self.tx.send(r).await;
            }
            Err(code) => {
                let _ = recv.stop(VarInt::from_u32(code));
            }
        }
    }

    async fn on_bi(&self, live: Live, mut send: SendStream, mut recv: RecvStream) {
        match self.read_frame(&live, &mut recv).await {
            Ok(frame) => {
                let r = Received {
                    peer: live.peer.clone(),
                    frame,
                    reply: Some(Responder {
                        send: Some(send),
                        addr: live.peer.addr,
                        max_frame: self.cfg.max_frame,
                        timeout: self.cfg.request_timeout,
                    }),
                };
                if let Err(e) = self.tx.send(r).await {
                    // The node is gone; the dropped responder says so.
                    if let Some(mut s) = e.into_inner().reply.and_then(|mut r| r.send.take()) {
                        let _ = s.reset(VarInt::from_u32(STREAM_SHUTDOWN));
                    }
                }
            }
            Err(code) => {
                let _ = recv.stop(VarInt::from_u32(code));
                let _ = send.reset(VarInt::from_u32(code));
            }
        }
    }

    async fn send_on(&self, live: Live, bytes: &[u8]) -> Result<(), SendError> {
        let addr = live.peer.addr;
        let op = async {
            let mut s = live.conn.open_uni().await.map_err(|e| lost(addr, e))?;
            s.write_all(bytes).await.map_err(|e| write_err(addr, e))?;
            let _ = s.finish();
            match s.stopped().await {
                Ok(None) => Ok(()),
                Ok(Some(code)) => Err(SendError::Refused {
                    addr,
                    reason: stream_code_text(code.into_inner()),
                }),
                Err(quinn::StoppedError::ConnectionLost(e)) => Err(lost(addr, e)),
                Err(e) => Err(SendError::Stream {
                    addr,
                    reason: e.to_string(),
                }),
            }
        };
        timeout(self.cfg.request_timeout, op)
            .await
            .unwrap_or(Err(SendError::Timeout {
                addr,
                what: "sending a frame",
            }))
    }

    async fn request_on(&self, live: Live, bytes: &[u8]) -> Result<Frame, SendError> {
        let addr = live.peer.addr;
        let max = self.cfg.max_frame;
        let op = async {
            let (mut send, mut recv) = live.conn.open_bi().await.map_err(|e| lost(addr, e))?;
            send.write_all(bytes)
                .await
                .map_err(|e| write_err(addr, e))?;
            let _ = send.finish();
            let reply = recv
                .read_to_end(max)
                .await
                .map_err(|e| read_err(addr, e, max))?;
            let frame =
                Frame::decode(&reply).map_err(|reason| SendError::BadReply { addr, reason })?;
            if !live.peer.owns(frame.from) {
                warn!(peer = %addr, claimed = %frame.from,
                    "reply from a vnode id the peer's certificate does not grant; closing");
                live.conn
                    .close(VarInt::from_u32(CLOSE_BAD_ID), b"vnode id not granted");
                return Err(SendError::BadReply {
                    addr,
                    reason: format!("reply claims {} which the peer does not own", frame.from),
                });
            }
            Ok(frame)
        };
        timeout(self.cfg.request_timeout, op)
            .await
            .unwrap_or(Err(SendError::Timeout {
                addr,
                what: "waiting for a reply",
            }))
    }
}

/// In TLS 1.3 the client finishes its handshake before the server has
/// checked the client's certificate, so a refusal of ours arrives right
/// after: as a close with a TLS alert code, or, when our first packets
/// outrun that close, as a stateless reset of a connection that was just
/// made. Both are reported as a refused connect.
fn handshake_refusal(live: &Live, fresh: bool) -> Option<SendError> {
    let addr = live.peer.addr;
    let reason = match live.conn.close_reason()? {
        quinn::ConnectionError::ConnectionClosed(c)
            if (0x100..0x200).contains(&u64::from(c.error_code)) =>
        {
            format!("refused by the peer: {c}")
        }
        quinn::ConnectionError::Reset if fresh => {
            "refused by the peer right after the handshake (reset)".to_string()
        }
        _ => return None,
    };
    warn!(peer = %addr, %reason, "peer refused the connection");
    Some(SendError::Connect { addr, reason })
}

fn check_expect(live: &Live, expect: Option<NodeId>) -> Result<(), SendError> {
    match expect {
        Some(id) if !live.peer.owns(id) => Err(SendError::WrongPeer {
            addr: live.peer.addr,
            expected: id,
            name: live.peer.name.clone(),
        }),
        _ => Ok(()),
    }
}

/// Closes and forgets the least recently used slot not busy connecting.
/// Empty slots (failed connects) go first.
fn evict_one(map: &mut HashMap<SocketAddr, Arc<Slot>>) {
    let victim = map
        .iter()
        .filter_map(|(a, s)| {
            let st = s.state.try_lock()?;
            Some((st.live.is_some(), s.last_used.load(Ordering::Relaxed), *a))
        })
        .min();
    let Some((_, _, addr)) = victim else { return };
    if let Some(s) = map.get(&addr) {
        if let Some(mut st) = s.state.try_lock() {
            st.evicted = true;
            if let Some(l) = st.live.take() {
                debug!(peer = %addr, "evicting cached connection");
                l.conn.close(VarInt::from_u32(CLOSE_EVICTED), b"evicted");
            }
        } else {
            return;
        }
    }
    map.remove(&addr);
}

/// The verified peer certificate of `conn`, read.
fn peer_of(conn: &Connection) -> Result<PeerInfo, String> {
    let certs = conn
        .peer_identity()
        .ok_or("no peer certificate")?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "peer identity is not a certificate chain")?;
    let first = certs.first().ok_or("empty certificate chain")?;
    PeerInfo::from_cert(conn.remote_address(), first)
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        if shared.endpoint.open_connections() >= 2 * shared.cfg.max_connections {
            warn!(peer = %incoming.remote_address(), "too many connections; refused");
            incoming.refuse();
            continue;
        }
        smol::spawn(shared.clone().accept_one(incoming)).detach();
    }
}
