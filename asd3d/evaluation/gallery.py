"""A static HTML gallery of an evaluation that opens from the file system, without a server.

``<eval dir>/index.html`` lists every prompt with its turntable video, its metrics (a table whose
columns sort on click) and a button that shows its mesh in one interactive WebGL view (drag to
orbit, wheel to zoom). Nothing is fetched over the network, and nothing with ``fetch()``:
Chromium blocks it for ``file://`` pages. Mesh data therefore travels in small ``.js`` files
(``gallery/<index>.js``) that the page loads with ``<script src>``, which ``file://`` allows;
each assigns its mesh, quantised to 16-bit positions and 8-bit colours, base64-encoded, to
``window.ASD3D_MESHES[<key>]``. The viewer is plain WebGL 1 written for this page (Lambert
shading of the vertex colours); one canvas serves all prompts, since browsers cap the number
of live WebGL contexts.

The page reports its own health in ``<pre id="asd3d-status">`` as JSON: videos loaded or failed,
meshes drawn or failed, and every uncaught error or ``console.error``. Opened as
``index.html#selftest`` it draws every mesh once, one after the other, so a headless browser can
check the whole gallery (``tests/evaluation/test_gallery.py``).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asd3d.evaluation.mesh import ColoredMesh
from asd3d.io import atomic_write_text

__all__ = ["write_gallery", "write_mesh_asset"]

_MAX_U16 = 65535


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def write_mesh_asset(
    mesh: ColoredMesh, path: str | os.PathLike[str], key: str, radius: float
) -> Path:
    """Write a mesh as a ``.js`` file the gallery loads with ``<script src>`` (atomically).

    Positions (world, ``+z`` up) are quantised to 16 bits over ``[-radius, radius]`` (error below
    ``radius / 65535``), colours are RGB bytes, indices 32-bit little-endian.
    """
    quantised = np.round((mesh.vertices / radius + 1.0) * 0.5 * _MAX_U16)
    payload = {
        "radius": float(radius),
        "vertexCount": int(len(mesh.vertices)),
        "faceCount": int(len(mesh.faces)),
        "positions": _b64(np.clip(quantised, 0, _MAX_U16).astype("<u2")),
        "colors": _b64(mesh.colors.astype(np.uint8)),
        "indices": _b64(mesh.faces.astype("<u4")),
    }
    script = (
        "window.ASD3D_MESHES = window.ASD3D_MESHES || {};\n"
        f"window.ASD3D_MESHES[{json.dumps(key)}] = {json.dumps(payload)};\n"
    )
    return atomic_write_text(path, script)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { padding: 12px 16px; border-bottom: 1px solid #ddd; }
header h1 { font-size: 18px; margin: 0 0 4px 0; }
header .means { font-size: 13px; color: #555; }
main { display: flex; align-items: flex-start; gap: 16px; padding: 12px 16px; }
#list { flex: 1 1 auto; border-collapse: collapse; font-size: 13px; }
#list th { cursor: pointer; text-align: left; border-bottom: 2px solid #999; padding: 4px 8px;
  user-select: none; white-space: nowrap; }
#list th.sorted-asc::after { content: " \\25B2"; }
#list th.sorted-desc::after { content: " \\25BC"; }
#list td { border-bottom: 1px solid #eee; padding: 4px 8px; vertical-align: middle; }
#list tr.selected { background: #eef4ff; }
#list video, #list img.turntable { width: 160px; height: 160px; background: #fff; display: block; }
#list td.num { font-variant-numeric: tabular-nums; text-align: right; }
#viewer { position: sticky; top: 12px; flex: 0 0 420px; }
#viewer canvas { width: 420px; height: 420px; border: 1px solid #ccc; cursor: grab; display: block; }
#viewer .caption { font-size: 13px; margin-top: 6px; min-height: 2.6em; }
#viewer .hint { font-size: 12px; color: #777; }
#asd3d-status { font-size: 11px; color: #999; white-space: pre-wrap; }
button { font-size: 12px; }
"""

# The page script: sorting, video bookkeeping, the WebGL mesh viewer, the status report.
_SCRIPT = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("asd3d-data").textContent);
  var status = { videos: { total: 0, loaded: 0, failed: 0 },
                 meshes: { total: 0, drawn: 0, failed: 0 }, errors: [], done: false };
  var statusEl = document.getElementById("asd3d-status");
  function report() { statusEl.textContent = JSON.stringify(status); }
  window.addEventListener("error", function (e) {
    status.errors.push(String(e.message || e.type)); report();
  });
  var consoleError = console.error;
  console.error = function () {
    status.errors.push(Array.prototype.map.call(arguments, String).join(" ")); report();
    consoleError.apply(console, arguments);
  };

  // ---- sortable table
  var table = document.getElementById("list");
  var body = table.tBodies[0];
  var sortKey = null, sortDir = 1;
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
    var key = th.getAttribute("data-key");
    if (!key) return;
    th.addEventListener("click", function () {
      sortDir = (sortKey === key) ? -sortDir : (th.getAttribute("data-type") === "num" ? -1 : 1);
      sortKey = key;
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.getAttribute("data-" + key), y = b.getAttribute("data-" + key);
        if (th.getAttribute("data-type") === "num") { x = parseFloat(x); y = parseFloat(y); }
        return x < y ? -sortDir : x > y ? sortDir : 0;
      });
      rows.forEach(function (r) { body.appendChild(r); });
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) {
        c.classList.remove("sorted-asc", "sorted-desc");
      });
      th.classList.add(sortDir > 0 ? "sorted-asc" : "sorted-desc");
    });
  });

  // ---- videos
  var videos = document.querySelectorAll("video");
  status.videos.total = videos.length;
  Array.prototype.forEach.call(videos, function (v) {
    var settled = false;
    function ok() { if (!settled) { settled = true; status.videos.loaded++; check(); } }
    function bad() {
      if (!settled) { settled = true; status.videos.failed++;
        status.errors.push("video failed: " + v.getAttribute("src")); check(); }
    }
    v.addEventListener("loadeddata", ok);
    v.addEventListener("error", bad);
    if (v.readyState >= 2) ok();
    v.load();
  });

  // ---- WebGL viewer
  var canvas = document.getElementById("mesh-canvas");
  var gl = canvas.getContext("webgl", { preserveDrawingBuffer: true, antialias: true });
  var caption = document.getElementById("mesh-caption");
  var VS = "attribute vec3 p; attribute vec3 c; attribute vec3 n; uniform mat4 mvp;" +
    "varying vec3 vc; varying vec3 vn; void main() { vc = c; vn = n; gl_Position = mvp * vec4(p, 1.0); }";
  var FS = "precision mediump float; varying vec3 vc; varying vec3 vn; uniform vec3 light;" +
    "void main() { float d = abs(dot(normalize(vn), light));" +
    " gl_FragColor = vec4(vc * (0.35 + 0.65 * d), 1.0); }";
  function shader(type, src) {
    var s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
    return s;
  }
  var program = null, loc = {};
  if (gl) {
    program = gl.createProgram();
    gl.attachShader(program, shader(gl.VERTEX_SHADER, VS));
    gl.attachShader(program, shader(gl.FRAGMENT_SHADER, FS));
    gl.linkProgram(program);
    if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(program));
    ["p", "c", "n"].forEach(function (a) { loc[a] = gl.getAttribLocation(program, a); });
    loc.mvp = gl.getUniformLocation(program, "mvp");
    loc.light = gl.getUniformLocation(program, "light");
    gl.getExtension("OES_element_index_uint");
  }
  var view = { azimuth: 0.6, elevation: 0.35, distance: 3.0, target: [0, 0, 0] };
  var current = null;  // {buffers, count, radius}

  function bytes(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  function parseMesh(m) {
    var q = new Uint16Array(bytes(m.positions).buffer);
    var col = bytes(m.colors);
    var idx = new Uint32Array(bytes(m.indices).buffer);
    if (q.length !== 3 * m.vertexCount || col.length !== 3 * m.vertexCount ||
        idx.length !== 3 * m.faceCount) throw new Error("mesh arrays do not match their counts");
    var n = m.vertexCount, pos = new Float32Array(3 * n), c = new Float32Array(3 * n);
    for (var i = 0; i < 3 * n; i++) { pos[i] = (q[i] / 65535 * 2 - 1) * m.radius; c[i] = col[i] / 255; }
    var nrm = new Float32Array(3 * n);
    for (var f = 0; f < idx.length; f += 3) {
      var a = 3 * idx[f], b = 3 * idx[f + 1], d = 3 * idx[f + 2];
      var ux = pos[b] - pos[a], uy = pos[b + 1] - pos[a + 1], uz = pos[b + 2] - pos[a + 2];
      var vx = pos[d] - pos[a], vy = pos[d + 1] - pos[a + 1], vz = pos[d + 2] - pos[a + 2];
      var nx = uy * vz - uz * vy, ny = uz * vx - ux * vz, nz = ux * vy - uy * vx;
      [a, b, d].forEach(function (k) { nrm[k] += nx; nrm[k + 1] += ny; nrm[k + 2] += nz; });
    }
    var lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
    for (var v = 0; v < 3 * n; v += 3) for (var ax = 0; ax < 3; ax++) {
      lo[ax] = Math.min(lo[ax], pos[v + ax]); hi[ax] = Math.max(hi[ax], pos[v + ax]);
    }
    var center = [0, 1, 2].map(function (ax) { return 0.5 * (lo[ax] + hi[ax]); });
    var size = Math.max(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]) || m.radius;
    return { pos: pos, col: c, nrm: nrm, idx: idx, center: center, size: size };
  }
  function upload(mesh) {
    function buffer(target, data) {
      var b = gl.createBuffer(); gl.bindBuffer(target, b); gl.bufferData(target, data, gl.STATIC_DRAW);
      return b;
    }
    if (current) ["p", "c", "n", "i"].forEach(function (k) { gl.deleteBuffer(current.buffers[k]); });
    view.target = mesh.center;
    current = { count: mesh.idx.length, buffers: {
      p: buffer(gl.ARRAY_BUFFER, mesh.pos), c: buffer(gl.ARRAY_BUFFER, mesh.col),
      n: buffer(gl.ARRAY_BUFFER, mesh.nrm), i: buffer(gl.ELEMENT_ARRAY_BUFFER, mesh.idx) } };
  }
  function matrix() {  // perspective * look-at, column-major, world +z up
    var ce = Math.cos(view.elevation), r = view.distance;
    var o = [r * ce * Math.cos(view.azimuth), r * ce * Math.sin(view.azimuth), r * Math.sin(view.elevation)];
    var t0 = view.target, eye = [t0[0] + o[0], t0[1] + o[1], t0[2] + o[2]];
    var f = [-o[0], -o[1], -o[2]], fl = Math.hypot(f[0], f[1], f[2]);
    f = [f[0] / fl, f[1] / fl, f[2] / fl];
    var s = [f[1], -f[0], 0], sl = Math.hypot(s[0], s[1]) || 1; s = [s[0] / sl, s[1] / sl, 0];
    var u = [s[1] * f[2] - s[2] * f[1], s[2] * f[0] - s[0] * f[2], s[0] * f[1] - s[1] * f[0]];
    var V = [s[0], u[0], -f[0], 0, s[1], u[1], -f[1], 0, s[2], u[2], -f[2], 0,
      -(s[0] * eye[0] + s[1] * eye[1] + s[2] * eye[2]), -(u[0] * eye[0] + u[1] * eye[1] + u[2] * eye[2]),
      (f[0] * eye[0] + f[1] * eye[1] + f[2] * eye[2]), 1];
    var near = 0.05, far = 50, t = 1 / Math.tan(35 * Math.PI / 360);
    var P = [t, 0, 0, 0, 0, t, 0, 0, 0, 0, (far + near) / (near - far), -1, 0, 0, 2 * far * near / (near - far), 0];
    var M = new Float32Array(16);
    for (var i = 0; i < 4; i++) for (var j = 0; j < 4; j++) {
      var sum = 0; for (var k = 0; k < 4; k++) sum += P[k * 4 + j] * V[i * 4 + k]; M[i * 4 + j] = sum;
    }
    return { mvp: M, eye: o };
  }
  function draw() {
    if (!gl) return 0;
    gl.viewport(0, 0, canvas.width, canvas.height);
    gl.clearColor(1, 1, 1, 1);
    gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
    if (!current) return 0;
    gl.enable(gl.DEPTH_TEST);
    gl.useProgram(program);
    var m = matrix(), el = Math.hypot(m.eye[0], m.eye[1], m.eye[2]);
    gl.uniformMatrix4fv(loc.mvp, false, m.mvp);
    gl.uniform3f(loc.light, m.eye[0] / el, m.eye[1] / el, m.eye[2] / el);
    [["p", 3], ["c", 3], ["n", 3]].forEach(function (a) {
      gl.bindBuffer(gl.ARRAY_BUFFER, current.buffers[a[0]]);
      gl.enableVertexAttribArray(loc[a[0]]);
      gl.vertexAttribPointer(loc[a[0]], a[1], gl.FLOAT, false, 0, 0);
    });
    gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, current.buffers.i);
    gl.drawElements(gl.TRIANGLES, current.count, gl.UNSIGNED_INT, 0);
    return current.count;
  }
  function coveredPixels() {  // how many pixels the last draw changed from the white background
    var w = canvas.width, h = canvas.height, px = new Uint8Array(4 * w * h), n = 0;
    gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, px);
    for (var i = 0; i < px.length; i += 4) if (px[i] < 250 || px[i + 1] < 250 || px[i + 2] < 250) n++;
    return n;
  }

  var loaded = {};
  function loadMesh(entry, done) {
    if (!entry.mesh_asset) { done(new Error("no mesh for prompt " + entry.index)); return; }
    if (window.ASD3D_MESHES && window.ASD3D_MESHES[entry.key]) { done(null); return; }
    var s = document.createElement("script");
    s.src = entry.mesh_asset;
    s.onload = function () { done(window.ASD3D_MESHES && window.ASD3D_MESHES[entry.key] ? null
      : new Error("mesh script did not define " + entry.key)); };
    s.onerror = function () { done(new Error("mesh script failed to load: " + entry.mesh_asset)); };
    document.head.appendChild(s);
  }
  function show(entry, callback) {
    loadMesh(entry, function (err) {
      var covered = 0;
      try {
        if (err) throw err;
        if (!gl) throw new Error("WebGL is not available");
        if (!loaded[entry.key]) loaded[entry.key] = parseMesh(window.ASD3D_MESHES[entry.key]);
        upload(loaded[entry.key]);
        view.distance = 2.2 * loaded[entry.key].size;
        draw();
        covered = coveredPixels();
        if (gl.getError() !== gl.NO_ERROR) throw new Error("WebGL error while drawing " + entry.key);
        if (covered === 0) throw new Error("mesh " + entry.key + " drew no pixels");
        caption.textContent = entry.prompt;
        Array.prototype.forEach.call(body.rows, function (r) {
          r.classList.toggle("selected", r.getAttribute("data-key") === entry.key);
        });
      } catch (e) {
        status.errors.push(String(e.message || e));
        err = e;
      }
      if (callback) callback(err, covered);
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("button.show-mesh"), function (b) {
    b.addEventListener("click", function () { show(DATA.prompts[+b.getAttribute("data-row")]); });
  });

  // orbit by drag, zoom by wheel
  var drag = null;
  canvas.addEventListener("mousedown", function (e) { drag = [e.clientX, e.clientY]; });
  window.addEventListener("mouseup", function () { drag = null; });
  window.addEventListener("mousemove", function (e) {
    if (!drag) return;
    view.azimuth -= (e.clientX - drag[0]) * 0.01;
    view.elevation = Math.max(-1.5, Math.min(1.5, view.elevation + (e.clientY - drag[1]) * 0.01));
    drag = [e.clientX, e.clientY]; draw();
  });
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault(); view.distance *= Math.exp(e.deltaY * 0.001); draw();
  }, { passive: false });

  // ---- status: meshes are checked one after the other (all of them with #selftest)
  var withMesh = DATA.prompts.filter(function (p) { return p.mesh_asset; });
  var queue = location.hash === "#selftest" ? withMesh.slice() : withMesh.slice(0, 1);
  status.meshes.total = queue.length;
  function next() {
    if (!queue.length) { if (withMesh.length) show(withMesh[0]); meshesDone = true; check(); return; }
    show(queue.shift(), function (err) {
      if (err) status.meshes.failed++; else status.meshes.drawn++;
      report(); next();
    });
  }
  var meshesDone = false;
  function check() {
    status.done = meshesDone &&
      status.videos.loaded + status.videos.failed === status.videos.total;
    report();
  }
  report();
  next();
})();
"""


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def write_gallery(
    out_dir: str | os.PathLike[str],
    entries: Sequence[dict[str, Any]],
    metric_names: Sequence[str],
    means: dict[str, float],
    title: str,
) -> Path:
    """Write ``<out_dir>/index.html`` for the per-prompt ``entries`` (atomically).

    Each entry has ``index``, ``prompt``, its metrics, ``turntable`` (a path relative to
    ``out_dir``) and optionally ``mesh_asset`` (a ``.js`` written by :func:`write_mesh_asset`,
    relative to ``out_dir``).
    """
    out_dir = Path(out_dir)
    prompts = [
        {
            "index": int(e["index"]),
            "key": f"p{int(e['index'])}",
            "prompt": e["prompt"],
            "mesh_asset": e.get("mesh_asset"),
        }
        for e in entries
    ]
    headers = ['<th data-key="index" data-type="num">#</th>', '<th data-key="prompt">prompt</th>']
    headers += [f'<th data-key="{m}" data-type="num">{html.escape(m)}</th>' for m in metric_names]
    headers += ["<th>turntable</th>", "<th>mesh</th>"]
    rows = []
    for row, (entry, meta) in enumerate(zip(entries, prompts, strict=True)):
        attrs = [f'data-key="{meta["key"]}"', f'data-index="{meta["index"]}"']
        attrs.append(f'data-prompt="{html.escape(entry["prompt"], quote=True)}"')
        attrs += [f'data-{m}="{float(entry[m])!r}"' for m in metric_names]
        cells = [
            f'<td class="num">{meta["index"]}</td>',
            f"<td>{html.escape(entry['prompt'])}</td>",
        ]
        cells += [f'<td class="num">{_fmt(float(entry[m]))}</td>' for m in metric_names]
        video = html.escape(entry["turntable"], quote=True)
        if video.lower().endswith(".gif"):  # turntable_format=gif: an image, not a video
            cells.append(f'<td><img class="turntable" src="{video}" alt="turntable"></td>')
        else:
            cells.append(
                f'<td><video src="{video}" autoplay loop muted playsinline preload="auto">'
                "</video></td>"
            )
        button = (
            f'<button class="show-mesh" data-row="{row}">3D</button>' if meta["mesh_asset"] else ""
        )
        cells.append(f"<td>{button}</td>")
        rows.append(f"<tr {' '.join(attrs)}>{''.join(cells)}</tr>")
    mean_text = ", ".join(f"{k} {v:.4f}" for k, v in means.items()) or "no metrics"
    # "</" inside a <script> block would end it early; JSON allows the escaped form.
    data = json.dumps({"prompts": prompts}).replace("</", "<\\/")
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>{html.escape(title)}</h1>
<div class="means">{len(entries)} prompts &middot; means: {html.escape(mean_text)} &middot;
click a column header to sort</div>
</header>
<main>
<table id="list">
<thead><tr>{"".join(headers)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<div id="viewer">
<canvas id="mesh-canvas" width="420" height="420"></canvas>
<div class="caption" id="mesh-caption"></div>
<div class="hint">drag to orbit, wheel to zoom; "3D" shows a prompt's mesh</div>
<pre id="asd3d-status"></pre>
</div>
</main>
<script type="application/json" id="asd3d-data">{data}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    return atomic_write_text(out_dir / "index.html", page)
