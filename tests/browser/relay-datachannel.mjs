// Opens a WebRTC data channel between two RTCPeerConnections in headless Chromium, each with
// a relay-only ICE policy, through one TURN URL at a time; prints one JSON line per URL with
// whether the channel opened, a message echoed, and the candidate types of the selected pair.
// Usage: node relay-datachannel.mjs USERNAME PASSWORD URL...
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [username, credential, ...urls] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), 'turnpike-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    // The test relay's certificate is self-signed.
    '--ignore-certificate-errors',
  ],
});
try {
  const page = await context.newPage();
  for (const url of urls) {
    const result = await page.evaluate(async ({ url, username, credential }) => {
      const config = { iceServers: [{ urls: [url], username, credential }], iceTransportPolicy: 'relay' };
      const a = new RTCPeerConnection(config);
      const b = new RTCPeerConnection(config);
      const errors = [];
      for (const [pc, other] of [[a, b], [b, a]]) {
        pc.onicecandidate = (e) => e.candidate && other.addIceCandidate(e.candidate);
        pc.onicecandidateerror = (e) => errors.push(`${e.errorCode} ${e.errorText} ${e.url}`);
      }
      const channel = a.createDataChannel('probe');
      const echoed = new Promise((resolve) => {
        b.ondatachannel = (e) => { e.channel.onmessage = (m) => e.channel.send(`echo:${m.data}`); };
        channel.onmessage = (m) => resolve(m.data);
      });
      const opened = new Promise((resolve) => { channel.onopen = () => resolve(true); });
      await a.setLocalDescription(await a.createOffer());
      await b.setRemoteDescription(a.localDescription);
      await b.setLocalDescription(await b.createAnswer());
      await a.setRemoteDescription(b.localDescription);
      const timeout = (ms) => new Promise((resolve) => setTimeout(() => resolve(false), ms));
      const open = await Promise.race([opened, timeout(20000)]);
      let echo = null;
      if (open) {
        channel.send('hello');
        echo = await Promise.race([echoed, timeout(5000)]);
      }
      const types = {};
      for (const [name, pc] of [['a', a], ['b', b]]) {
        const stats = await pc.getStats();
        let pair = null;
        stats.forEach((s) => {
          if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
        });
        if (!pair) stats.forEach((s) => { if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s; });
        types[name] = pair
          ? { local: stats.get(pair.localCandidateId)?.candidateType, remote: stats.get(pair.remoteCandidateId)?.candidateType,
              relayProtocol: stats.get(pair.localCandidateId)?.relayProtocol }
          : null;
      }
      a.close();
      b.close();
      return { url, open, echo, types, errors };
    }, { url, username, credential });
    console.log(JSON.stringify(result));
  }
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
