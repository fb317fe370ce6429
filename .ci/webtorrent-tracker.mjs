// webtorrent's bittorrent-tracker (installed by `npm ci --prefix .ci`), for tsmd's tests: UDP,
// HTTP and WebSocket on loopback, kernel-chosen ports, printed as one JSON line on stdout.
// The server module alone: the package's index also loads the WebRTC client, a native module.
import Server from 'bittorrent-tracker/server'

const server = new Server({ udp: true, http: true, ws: true, stats: false, trustProxy: false })
server.on('error', error => { console.error(`error: ${error.message}`) })
server.on('warning', () => {})  // a malformed request from a test: the tracker answers it
server.on('listening', () => {
  console.log(JSON.stringify({ http: server.http.address().port, udp: server.udp4.address().port }))
})
server.listen(0, { http: '127.0.0.1', udp: '127.0.0.1', udp6: '::1' })
process.on('SIGTERM', () => server.close(() => process.exit(0)))
