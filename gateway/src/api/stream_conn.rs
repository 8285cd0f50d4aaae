//! The connection of an upgraded chunk stream (docs/protocol.md, "Chunk
//! streams"), as `agent::serve_chunk_stream` reads and answers it.
//!
//! After the upgrade the connection carries only application data, so when
//! it is TLS 1.3 the gateway takes its traffic secrets from rustls
//! ([`rustls::ServerConnection::dangerous_extract_secrets`], the hand-over
//! rustls makes for kernel TLS) and protects the records itself (RFC 8446
//! §5.2–5.4, with ring's AEADs, as rustls does): it reads the socket in large
//! pieces instead of one record per read, and decrypts each record straight
//! to where its plaintext belongs, ring's `open_within` moving it over the
//! framing of the records before it, so a chunk's bytes end up in one buffer
//! without being copied. Anything but application data after the handshake
//! (a key update, an alert other than close_notify) ends the stream with an
//! error; the agent sends that batch again as a request. Other connections
//! (TLS 1.2) are read through rustls as before ([`Plain`]).

use std::future::Future;
use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// What a chunk stream is read from and answered on.
pub(crate) trait StreamConn: Send {
    /// Fills `buf` from the stream.
    fn read_exact(&mut self, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// The next `n` bytes of the stream, in one buffer.
    fn read_bytes(&mut self, n: usize) -> impl Future<Output = io::Result<Bytes>> + Send;
    /// Sends `frame` whole.
    fn send(&mut self, frame: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
}

/// An upgraded connection taken over for a chunk stream.
pub(crate) enum Taken {
    /// TLS 1.3: records protected by the gateway itself.
    Records(Box<RecordStream>),
    /// TLS through rustls, with what hyper had read past the request.
    Rustls(Box<Plain<TlsStream<TcpStream>>>),
    /// A connection of another kind (not the gateway's own listener).
    Other(Plain<TokioIo<hyper::upgrade::Upgraded>>),
}

/// Takes over the connection of an upgraded request. Fails only when the
/// secrets could not be taken from rustls after the checks that they can
/// (the connection is lost then; the agent sends its batches as requests).
pub(crate) fn take_over(up: hyper::upgrade::Upgraded) -> io::Result<Taken> {
    match up.downcast::<TokioIo<TlsStream<TcpStream>>>() {
        Ok(parts) => from_tls(parts.io.into_inner(), parts.read_buf),
        Err(up) => Ok(Taken::Other(Plain {
            prefix: Bytes::new(),
            io: TokioIo::new(up),
        })),
    }
}

/// [`take_over`] of a TLS connection, after `read_buf` (plaintext hyper
/// read past the request).
fn from_tls(tls: TlsStream<TcpStream>, read_buf: Bytes) -> io::Result<Taken> {
    let conn = tls.get_ref().1;
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3)
        || conn.is_handshaking()
        || conn.wants_write()
    {
        return Ok(Taken::Rustls(Box::new(Plain {
            prefix: read_buf,
            io: tls,
        })));
    }
    let (tcp, mut conn) = tls.into_inner();
    // After hyper's bytes comes any plaintext rustls decrypted but nobody
    // read yet. (An agent sends nothing before the upgrade's answer, so
    // rustls holds no part of a record here; a client that does breaks
    // only its own stream: the record fails authentication.)
    let mut prefix = BytesMut::from(&read_buf[..]);
    let mut piece = [0u8; 4096];
    while let Ok(n @ 1..) = io::Read::read(&mut conn.reader(), &mut piece) {
        prefix.extend_from_slice(&piece[..n]);
    }
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| io::Error::other(format!("taking the TLS secrets: {e}")))?;
    Ok(Taken::Records(Box::new(RecordStream::new(
        tcp, secrets.rx, secrets.tx, prefix,
    )?)))
}

/// A connection read and written as it is, after `prefix`.
pub(crate) struct Plain<S> {
    prefix: Bytes,
    io: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> StreamConn for Plain<S> {
    async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let k = self.prefix.len().min(buf.len());
        self.prefix.copy_to_slice(&mut buf[..k]);
        self.io.read_exact(&mut buf[k..]).await.map(drop)
    }

    async fn read_bytes(&mut self, n: usize) -> io::Result<Bytes> {
        let mut data = BytesMut::with_capacity(n);
        let k = self.prefix.len().min(n);
        data.extend_from_slice(&self.prefix.split_to(k));
        while data.len() < n {
            let want = (n - data.len()) as u64;
            if (&mut self.io).take(want).read_buf(&mut data).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(data.freeze())
    }

    async fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.io.write_all(frame).await?;
        self.io.flush().await
    }
}

/// The largest plaintext of one record (RFC 8446 §5.1).
const MAX_PLAIN: usize = 1 << 14;
/// The largest length of a protected record (§5.2).
const MAX_PROTECTED: usize = MAX_PLAIN + 256;
const HEADER_LEN: usize = 5;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// Bytes around the plaintext of a record: header, inner content type and
/// the AEAD tag (16 bytes for every TLS 1.3 AEAD ring offers).
const FRAMING: usize = HEADER_LEN + 1 + 16;
/// Bytes asked of the socket per read at least (heads are a few bytes).
const MIN_READ: usize = 64 << 10;
/// Room of a fresh buffer before any chunk's size is known: a 1 MiB chunk
/// with its framing.
const FIRST_ROOM: usize = (1 << 20) + (64 << 10);

/// Wire bytes that carry `plain` bytes of application data, at most.
fn wire_len(plain: usize) -> usize {
    plain + (plain / MAX_PLAIN + 1) * FRAMING
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One direction's record protection: key, IV and the next sequence
/// number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Direction> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("a TLS cipher the chunk stream does not know")),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| invalid("a bad TLS key"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("a bad TLS IV"))?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (§5.3: the IV xor the sequence number),
    /// counting the record.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (b, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("TLS record sequence numbers exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// A TLS 1.3 connection whose records the gateway protects itself.
pub(crate) struct RecordStream {
    tcp: TcpStream,
    rx: Direction,
    tx: Direction,
    /// `[..plain]`: application data not yet taken; `[cipher..]`: received
    /// bytes of records not yet decrypted; between them, spent framing.
    buf: BytesMut,
    plain: usize,
    cipher: usize,
    /// Room a new buffer gets at a head: the largest chunk asked for so far,
    /// its framing and a read's worth of what follows.
    room: usize,
    /// The peer sent close_notify: nothing more comes.
    closed: bool,
}

impl RecordStream {
    fn new(
        tcp: TcpStream,
        rx: (u64, ConnectionTrafficSecrets),
        tx: (u64, ConnectionTrafficSecrets),
        prefix: BytesMut,
    ) -> io::Result<RecordStream> {
        let plain = prefix.len();
        Ok(RecordStream {
            tcp,
            rx: Direction::new(rx)?,
            tx: Direction::new(tx)?,
            buf: prefix,
            plain,
            cipher: plain,
            room: FIRST_ROOM,
            closed: false,
        })
    }

    /// Decrypts every whole record received, each to the end of the
    /// plaintext before it.
    fn open_records(&mut self) -> io::Result<()> {
        while !self.closed {
            let Some(header) = self.buf.get(self.cipher..self.cipher + HEADER_LEN) else {
                return Ok(());
            };
            let header: [u8; HEADER_LEN] = header.try_into().map_err(|_| invalid("header"))?;
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[..3] != [APPLICATION_DATA, 3, 3] {
                return Err(invalid(format!(
                    "a TLS record of type {} (version {:02x}{:02x}) after the handshake",
                    header[0], header[1], header[2]
                )));
            }
            if !(FRAMING - HEADER_LEN..=MAX_PROTECTED).contains(&len) {
                return Err(invalid(format!("a TLS record of {len} bytes")));
            }
            let start = self.cipher + HEADER_LEN;
            let end = start + len;
            if self.buf.len() < end {
                return Ok(());
            }
            let nonce = self.rx.next_nonce()?;
            let from = start - self.plain;
            let inner = self
                .rx
                .key
                .open_within(
                    nonce,
                    Aad::from(header),
                    &mut self.buf[self.plain..end],
                    from..,
                )
                .map_err(|_| invalid("a TLS record failed authentication"))?;
            // TLSInnerPlaintext: content, content type, zero padding.
            let Some(at) = inner.iter().rposition(|&b| b != 0) else {
                return Err(invalid("a TLS record without a content type"));
            };
            match (inner[at], &inner[..at]) {
                (APPLICATION_DATA, data) if data.len() <= MAX_PLAIN => self.plain += at,
                (APPLICATION_DATA, _) => return Err(invalid("a TLS record over 16 KiB")),
                (ALERT, [_, 0]) => self.closed = true,
                (ALERT, [_, d]) => return Err(invalid(format!("TLS alert {d} from the agent"))),
                (HANDSHAKE, _) => {
                    return Err(invalid(
                        "a TLS handshake message (key update) on a chunk stream",
                    ))
                }
                (t, _) => return Err(invalid(format!("a TLS record of content type {t}"))),
            }
            self.cipher = end;
        }
        Ok(())
    }

    /// Reads and decrypts until `want` bytes of application data are held:
    /// a head (`at_head`, read ahead by [`MIN_READ`]) or a chunk's data
    /// (read no further than its records).
    async fn fill(&mut self, want: usize, at_head: bool) -> io::Result<()> {
        while self.plain < want {
            if self.closed {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let wire = self
                .wire_needed(want)
                .max(if at_head { MIN_READ } else { 0 });
            self.make_room(wire, at_head);
            let n = self.tcp.read_buf(&mut (&mut self.buf).limit(wire)).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection without close_notify",
                ));
            }
            self.open_records()?;
        }
        Ok(())
    }

    /// Received bytes still to come for `want` bytes of application data:
    /// the records that carry them, at least the rest of the record begun.
    fn wire_needed(&self, want: usize) -> usize {
        let pending = self.buf.len() - self.cipher;
        let begun = self
            .buf
            .get(self.cipher + 3..self.cipher + HEADER_LEN)
            .map_or(0, |l| {
                HEADER_LEN + usize::from(u16::from_be_bytes([l[0], l[1]]))
            });
        wire_len(want - self.plain)
            .max(begun)
            .saturating_sub(pending)
            .max(1)
    }

    /// Room for `wire` more received bytes; at a head, room for the whole
    /// chunk after it ([`Self::room`]), so that its head and data land in
    /// one buffer. A new buffer gets [`Self::room`] at least (the framing a
    /// read is sized by is a guess: records split where the agent's writes
    /// do), and only the application data held and the partial record move
    /// into it (spent framing between them is dropped). `BytesMut::reserve`
    /// would grow the old buffer instead, doubling it and copying its dead
    /// front whenever the chunks split off it were already stored.
    fn make_room(&mut self, wire: usize, at_head: bool) {
        let need = if at_head { wire.max(self.room) } else { wire };
        if self.buf.capacity() - self.buf.len() >= need {
            return;
        }
        let pending = self.buf.len() - self.cipher;
        let mut fresh = BytesMut::with_capacity(self.plain + pending + need.max(self.room));
        fresh.extend_from_slice(&self.buf[..self.plain]);
        fresh.extend_from_slice(&self.buf[self.cipher..]);
        self.buf = fresh;
        self.cipher = self.plain;
    }

    /// `frame` as the records that carry it.
    fn seal(&mut self, frame: &[u8]) -> io::Result<Vec<u8>> {
        let tag_len = self.tx.key.algorithm().tag_len();
        let mut out = Vec::with_capacity(wire_len(frame.len()));
        for piece in frame.chunks(MAX_PLAIN) {
            let len = piece.len() + 1 + tag_len;
            let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
            out.extend_from_slice(&header);
            let at = out.len();
            out.extend_from_slice(piece);
            out.push(APPLICATION_DATA);
            let nonce = self.tx.next_nonce()?;
            let tag = self
                .tx
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[at..])
                .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
            out.extend_from_slice(tag.as_ref());
        }
        Ok(out)
    }

    fn consume(&mut self, n: usize) {
        self.plain -= n;
        self.cipher -= n;
    }
}

impl StreamConn for RecordStream {
    /// A head: read ahead, and a new buffer has room for the chunk after it
    /// (its head and data land in one).
    async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.fill(buf.len(), true).await?;
        buf.copy_from_slice(&self.buf[..buf.len()]);
        self.buf.advance(buf.len());
        self.consume(buf.len());
        Ok(())
    }

    /// A chunk's data: read no further than its records (what follows is
    /// the next head, for the next buffer), split off without a copy. Data
    /// much smaller than a buffer (a patch) is copied out instead, so it
    /// does not keep a chunk-sized buffer alive while it waits to be stored.
    async fn read_bytes(&mut self, n: usize) -> io::Result<Bytes> {
        self.room = self.room.max(wire_len(n) + MIN_READ);
        self.fill(n, false).await?;
        let data = if n < self.room / 8 {
            let data = Bytes::copy_from_slice(&self.buf[..n]);
            self.buf.advance(n);
            data
        } else {
            self.buf.split_to(n).freeze()
        };
        self.consume(n);
        Ok(data)
    }

    async fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let records = self.seal(frame)?;
        self.tcp.write_all(&records).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio_rustls::client::TlsStream as ClientTls;

    /// A TLS connection over loopback: the gateway's side (its own server
    /// configuration, offering only TLS 1.2 with `tls12`) and a rustls
    /// client's.
    async fn connect(
        tls12: bool,
        client_secrets: bool,
    ) -> (TlsStream<TcpStream>, ClientTls<TcpStream>) {
        let id = crate::tls::generate("127.0.0.1").expect("identity");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &id.cert_pem).expect("cert");
        std::fs::write(&key, &id.key_pem).expect("key");
        let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            rustls::DEFAULT_VERSIONS
        };
        let server = crate::tls::server_config_with(&cert, &key, versions).expect("server config");
        let mut client = tierback_format::pin::pinned_client_config(&id.fingerprint).expect("pin");
        client.enable_secret_extraction = client_secrets;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .expect("server handshake")
        };
        let dial = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await
                .expect("client handshake")
        };
        tokio::join!(accept, dial)
    }

    fn records(tls: TlsStream<TcpStream>) -> RecordStream {
        match from_tls(tls, Bytes::new()).expect("taken over") {
            Taken::Records(r) => *r,
            _ => panic!("a TLS 1.3 connection was not taken over"),
        }
    }

    /// The client's side as a record stream of its own, to send what a
    /// rustls client would not.
    fn raw_client(client: ClientTls<TcpStream>) -> RecordStream {
        let (tcp, conn) = client.into_inner();
        let secrets = conn.dangerous_extract_secrets().expect("client secrets");
        RecordStream::new(tcp, secrets.rx, secrets.tx, BytesMut::new()).expect("client records")
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[tokio::test]
    async fn what_a_rustls_client_sends_arrives_whole_and_the_answers_reach_it() {
        let (server, mut client) = connect(false, false).await;
        let mut s = records(server);
        let data = pattern(3 << 20);
        let sent = data.clone();
        let agent = tokio::spawn(async move {
            // Writes of assorted sizes make records of assorted sizes.
            let mut at = 0;
            for n in [1usize, 7, 16_383, 16_385, 100_000, 1 << 20].iter().cycle() {
                let end = (at + n).min(sent.len());
                client.write_all(&sent[at..end]).await.expect("write");
                client.flush().await.expect("flush");
                at = end;
                if at == sent.len() {
                    break;
                }
            }
            let mut answer = vec![0u8; 40_000];
            client.read_exact(&mut answer).await.expect("answer");
            client.shutdown().await.expect("close_notify");
            answer
        });
        let mut head = [0u8; 8];
        s.read_exact(&mut head).await.expect("head");
        assert_eq!(head[..], data[..8]);
        let chunk = s.read_bytes(1 << 20).await.expect("chunk");
        assert_eq!(chunk[..], data[8..8 + (1 << 20)]);
        let mut small = [0u8; 40];
        s.read_exact(&mut small).await.expect("small");
        assert_eq!(small[..], data[8 + (1 << 20)..48 + (1 << 20)]);
        let rest = s
            .read_bytes(data.len() - 48 - (1 << 20))
            .await
            .expect("rest");
        assert_eq!(rest[..], data[48 + (1 << 20)..]);
        let answer = pattern(40_000);
        s.send(&answer).await.expect("send");
        assert_eq!(agent.await.expect("agent"), answer);
        let end = s.read_exact(&mut [0u8; 1]).await.expect_err("closed");
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_record_that_fails_authentication_ends_the_stream() {
        let (server, client) = connect(false, true).await;
        let mut s = records(server);
        let mut c = raw_client(client);
        let mut bad = c.seal(b"a chunk record").expect("seal");
        bad[HEADER_LEN + 3] ^= 1;
        c.tcp.write_all(&bad).await.expect("write");
        let e = s.read_exact(&mut [0u8; 4]).await.expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("authentication"), "{e}");
    }

    #[tokio::test]
    async fn records_of_a_wrong_type_or_size_end_the_stream() {
        for (raw, says) in [
            (vec![APPLICATION_DATA, 3, 3, 0xff, 0xff], "65535 bytes"),
            (vec![HANDSHAKE, 3, 3, 0, 40], "type 22"),
            (vec![APPLICATION_DATA, 3, 1, 0, 40], "version 0301"),
            (vec![APPLICATION_DATA, 3, 3, 0, 3], "3 bytes"),
        ] {
            let (server, client) = connect(false, true).await;
            let mut s = records(server);
            let mut c = raw_client(client);
            c.tcp.write_all(&raw).await.expect("write");
            let e = s.read_bytes(10).await.expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains(says), "{e} (wanted {says})");
        }
    }

    #[tokio::test]
    async fn a_key_update_ends_the_stream_with_an_error() {
        let (server, mut client) = connect(false, false).await;
        let mut s = records(server);
        client.write_all(b"before").await.expect("write");
        client.flush().await.expect("flush");
        client
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("key update");
        client.write_all(b"after").await.expect("write");
        client.flush().await.expect("flush");
        let mut before = [0u8; 6];
        s.read_exact(&mut before).await.expect("before the update");
        assert_eq!(&before, b"before");
        let e = s.read_exact(&mut [0u8; 5]).await.expect_err("refused");
        assert!(e.to_string().contains("key update"), "{e}");
    }

    #[tokio::test]
    async fn a_connection_cut_without_close_notify_is_an_early_end() {
        let (server, client) = connect(false, false).await;
        let mut s = records(server);
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.expect("FIN");
        let e = s.read_exact(&mut [0u8; 8]).await.expect_err("cut");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("close_notify"), "{e}");
    }

    #[tokio::test]
    async fn tls_1_2_is_read_through_rustls() {
        let (server, mut client) = connect(true, false).await;
        let Taken::Rustls(mut s) = from_tls(server, Bytes::from_static(b"pre")).expect("taken")
        else {
            panic!("TLS 1.2 was taken over");
        };
        client.write_all(b"fix and data").await.expect("write");
        client.flush().await.expect("flush");
        let mut head = [0u8; 6];
        s.read_exact(&mut head).await.expect("head");
        assert_eq!(&head, b"prefix");
        assert_eq!(&s.read_bytes(9).await.expect("data")[..], b" and data");
        s.send(b"ok").await.expect("send");
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).await.expect("answer");
        assert_eq!(&answer, b"ok");
    }
}
