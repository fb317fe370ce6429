// webtorrent's bittorrent-tracker (installed by `npm ci --prefix .ci`), for tsmd's tests: UDP
// (IPv4), HTTP and WebSocket on loopback, kernel-chosen ports, printed as one JSON line on
// stdout. The server module alone: the package's index also loads the WebRTC client, a native
// module. Any error before it listens ends the process, said on stderr, for the test to show.
import Server from 'bittorrent-tracker/server'

const server = new Server({ udp: true, http: true, ws: true, stats: false, trustProxy: false })
server.udp6.close()  // IPv6 loopback may be missing, and the tests use IPv4
server.udp6 = null
let listening = false
let waiting = 2
const ready = () => {
  if (--waiting > 0) return
  listening = true
  console.log(JSON.stringify({ http: server.http.address().port, udp: server.udp4.address().port }))
}
server.http.once('listening', ready)
server.udp4.once('listening', ready)
server.on('error', error => {
  console.error(`error: ${error.message}`)
  if (!listening) process.exit(1)
})
server.on('warning', () => {})  // a malformed request from a test: the tracker answers it
server.listen(0, { http: '127.0.0.1', udp: '127.0.0.1' })
process.on('SIGTERM', () => server.close(() => process.exit(0)))
