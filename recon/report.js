// The report's gallery: sort by any column, filter to failed / flagged / warnings, link to an item.
// The view lives in the URL fragment, so it can be shared: #sort=KEY&dir=asc|desc&show=all|failed|flagged|warnings
// (&item=ID scrolls to one item). No record content is in this script: it reads data-* attributes only and never
// writes HTML, so a caption is only ever text.
(function () {
  "use strict";
  var table = document.getElementById("gallery");
  if (!table) { return; }
  var body = table.tBodies[0];
  var original = Array.prototype.slice.call(body.rows);
  original.forEach(function (row, i) { row.dataset.order = String(i); });
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var view = document.getElementById("view");
  var show = document.getElementById("show");

  function state() {
    var s = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var eq = part.indexOf("=");
      if (eq > 0) { s[decodeURIComponent(part.slice(0, eq))] = decodeURIComponent(part.slice(eq + 1)); }
    });
    return {
      sort: s.sort || table.dataset.sort, dir: s.dir === "desc" || s.dir === "asc" ? s.dir : table.dataset.dir,
      show: s.show || "all", item: s.item || ""
    };
  }

  function fragment(s, extra) {
    var parts = ["sort=" + encodeURIComponent(s.sort), "dir=" + s.dir, "show=" + encodeURIComponent(s.show)];
    return "#" + parts.concat(extra || []).join("&");
  }

  function value(row, column) {
    var cell = row.cells[column];
    var v = cell ? parseFloat(cell.dataset.v) : NaN;
    return isFinite(v) ? v : null;
  }

  function keep(row, filter) {
    if (filter === "failed") { return row.dataset.status !== "ok"; }
    if (filter === "flagged") { return row.dataset.flagged === "1"; }
    if (filter === "warnings") { return row.dataset.warn === "1"; }
    return true;
  }

  function apply() {
    var s = state();
    var column = -1;
    headers.forEach(function (th, i) {
      th.removeAttribute("aria-sort");
      if (th.dataset.key === s.sort) { column = i; }
    });
    var rows = original.slice();
    if (column >= 0) {
      var sign = s.dir === "desc" ? -1 : 1;
      headers[column].setAttribute("aria-sort", s.dir === "desc" ? "descending" : "ascending");
      rows.sort(function (a, b) {
        var x = value(a, column), y = value(b, column);
        if (x === null || y === null) {  // missing values last, whatever the direction
          return (x === null) - (y === null) || a.dataset.order - b.dataset.order;
        }
        return sign * (x - y) || a.dataset.order - b.dataset.order;
      });
    }
    var shown = 0;
    rows.forEach(function (row) {
      var visible = keep(row, s.show);
      row.hidden = !visible;
      shown += visible ? 1 : 0;
      body.appendChild(row);
      var link = row.querySelector("a.itemlink");
      if (link) { link.setAttribute("href", fragment(s, ["item=" + encodeURIComponent(row.dataset.item)])); }
      row.classList.toggle("target", s.item !== "" && row.dataset.item === s.item);
    });
    if (show) { show.value = s.show; }
    if (view) {
      view.textContent = "Showing " + shown + " of " + rows.length + " items, sorted by " +
        (column >= 0 ? s.sort + (s.dir === "desc" ? " (descending)" : " (ascending)") : "input order") + ".";
    }
    if (s.item !== "") {
      var target = rows.filter(function (row) { return row.dataset.item === s.item; })[0];
      if (target) { target.scrollIntoView(); }
    }
  }

  headers.forEach(function (th) {
    if (!th.dataset.key) { return; }
    th.tabIndex = 0;
    th.addEventListener("click", function () {
      var s = state();
      s.dir = s.sort === th.dataset.key && s.dir === "asc" ? "desc" : "asc";
      s.sort = th.dataset.key;
      location.hash = fragment(s);
    });
  });
  if (show) {
    show.addEventListener("change", function () {
      var s = state();
      s.show = show.value;
      location.hash = fragment(s);
    });
  }
  window.addEventListener("hashchange", apply);
  apply();
}());
