//! The HTTP benches' clients: one keep-alive HTTP/1.1 connection on loopback, and the forms
//! they submit.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    /// The connection, buffered for reading.
    pub reader: BufReader<TcpStream>,
}

impl Conn {
    /// Connects with `TCP_NODELAY`.
    pub async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    /// Posts `body` and reads the response; returns its status and `X-Caseledger-Position`.
    pub async fn post(
        &mut self,
        path: &str,
        auth: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Option<u64>)> {
        let (status, position, _) = self.post_read(path, auth, body).await?;
        Ok((status, position))
    }

    /// [`Conn::post`], with the response body.
    pub async fn post_read(
        &mut self,
        path: &str,
        auth: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Option<u64>, Vec<u8>)> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: {auth}\r\nX-OpenRosa-Version: 3.0\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut length = 0usize;
        let mut position = None;
        loop {
            line.clear();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("x-caseledger-position") {
                    position = value.trim().parse().ok();
                }
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).await?;
        Ok((status, position, body))
    }
}

/// The password of client `i`.
pub fn password(i: usize) -> String {
    format!("pw-{i:03}-correct-horse-battery")
}

/// The `n`th form of client `c` (user `u-{c:03}`, login `user{c}`): a ~1.6 KB registration of a
/// case the user owns; distinct instance id and case. Returns the instance id and the bytes.
pub fn form(c: usize, n: u64) -> (String, Vec<u8>) {
    let id = format!("f{c:03}-{n:08}-5c1e-4a7b-9d2f-{:012x}", n * 7919 + c as u64);
    let user = super::user(c as u64);
    let xml = format!(
        r#"<?xml version="1.0"?>
<data xmlns="http://openrosa.org/formdesigner/BENCH-REG" name="Registration">
  <visit_date>2026-03-{day:02}</visit_date><hb_level>11.{n1}</hb_level><bp_systolic>1{n2:02}</bp_systolic>
  <danger_signs><bleeding>no</bleeding><headache>no</headache><fever>no</fever><swelling>no</swelling></danger_signs>
  <counselling><nutrition>yes</nutrition><birth_plan>yes</birth_plan><itn_use>yes</itn_use></counselling>
  <household><members>{n3}</members><water_source>piped</water_source><latrine>shared</latrine></household>
  <chw_notes>Client reports feeling well; reminded about the clinic visit, iron tablets and the birth plan. Husband present; both agreed to deliver at the facility.</chw_notes>
  <case xmlns="http://commcarehq.org/case/transaction/v2" case_id="case-{id}" date_modified="2026-03-{day:02}T10:00:00Z" user_id="{user}">
    <create><case_type>pregnancy</case_type><case_name>Client {n}</case_name><owner_id>{user}</owner_id></create>
    <update><edd>2026-09-{day:02}</edd><gravida>2</gravida><parity>1</parity><phone>+2547{n:08}</phone></update>
  </case>
  <meta xmlns="http://openrosa.org/jr/xforms"><deviceID>phone-{c}</deviceID><timeStart>2026-03-{day:02}T09:50:00Z</timeStart><timeEnd>2026-03-{day:02}T10:00:00Z</timeEnd><username>user{c}</username><userID>{user}</userID><instanceID>{id}</instanceID></meta>
</data>"#,
        day = 1 + n % 28,
        n1 = n % 10,
        n2 = n % 40,
        n3 = 2 + n % 6,
    );
    (id, xml.into_bytes())
}
