// The report's gallery: sort by any column, filter to failed / flagged / warnings, page through, link to an item.
// The view lives in the URL fragment, so it can be shared:
//   #sort=KEY&dir=asc|desc&show=all|failed|flagged|warnings&page=N   (&item=ID opens the page holding one item)
// Rows are of two kinds: the first ones are HTML in the page (with images); the rest are data (JSON in the page, or
// window.reconGalleryRows from the rows file beside it) that this script renders a page at a time. Sorting and
// filtering run over every row's data, not over the rows on screen. No record content is in this script, and it
// never writes HTML: a caption only ever becomes a text node.
(function () {
  "use strict";
  var table = document.getElementById("gallery");
  if (!table) { return; }
  var body = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var view = document.getElementById("view");
  var show = document.getElementById("show");
  var pageText = document.getElementById("page");
  var prev = document.getElementById("prev");
  var next = document.getElementById("next");
  var pageRows = parseInt(table.dataset.pageRows, 10) || 100;
  var note = "";

  // every row: {order, key, status, flagged, warn, el (its <tr>, once built), data (a data row) or null}
  var items = Array.prototype.slice.call(body.rows).map(function (row, i) {
    return {order: i, key: row.dataset.item, status: row.dataset.status, flagged: row.dataset.flagged === "1",
            warn: row.dataset.warn === "1", el: row, data: null};
  });
  var metrics = [];
  (function load() {
    var data = null;
    var inline = document.getElementById("gallery-rows");
    if (inline) {
      data = JSON.parse(inline.textContent);
    } else if (table.dataset.rowsFile) {
      var loaded = window.reconGalleryRows;
      if (loaded && loaded.token === table.dataset.token) {
        data = loaded.data;
      } else {
        note = " The other " + (parseInt(table.dataset.total, 10) - items.length) + " items are in " +
          table.dataset.rowsFile + (loaded ? ", which is from another report" : ", which is not beside this page") +
          ": only the items above are listed.";
      }
    }
    if (!data) { return; }
    metrics = data.metrics;
    data.rows.forEach(function (d) {
      items.push({order: items.length, key: d[0], status: d[2] ? "ok" : "failed", flagged: d[3] === 1,
                  warn: d[4].length > 0, el: null, data: d});
    });
  }());

  function state() {
    var s = {};
    try {
      location.hash.replace(/^#/, "").split("&").forEach(function (part) {
        var eq = part.indexOf("=");
        if (eq > 0) { s[decodeURIComponent(part.slice(0, eq))] = decodeURIComponent(part.slice(eq + 1)); }
      });
    } catch (e) {  // a malformed fragment ("#sort=%"): URIError; the default view, and the next click replaces it
      s = {};
    }
    var page = parseInt(s.page, 10);
    return {
      sort: s.sort || table.dataset.sort, dir: s.dir === "desc" || s.dir === "asc" ? s.dir : table.dataset.dir,
      show: s.show || "all", item: s.item || "", page: page > 0 ? page : 1
    };
  }

  function fragment(s, extra) {
    var parts = ["sort=" + encodeURIComponent(s.sort), "dir=" + s.dir, "show=" + encodeURIComponent(s.show)];
    return "#" + parts.concat(extra || []).join("&");
  }

  // the sort value of column `column` of an item: a finite number, or null (missing: sorted last)
  function valueOf(column) {
    var key = headers[column].dataset.key;
    var index = key === "@warnings" ? -1 : metrics.indexOf(key);
    return function (item) {
      var v;
      if (!item.data) {
        var cell = item.el.cells[column];
        v = cell ? parseFloat(cell.dataset.v) : NaN;
      } else if (key === "@warnings") {
        v = item.data[4].length;
      } else {
        v = index >= 0 ? item.data[8 + index] : null;
      }
      return typeof v === "number" && isFinite(v) ? v : null;
    };
  }

  function keep(item, filter) {
    if (filter === "failed") { return item.status !== "ok"; }
    if (filter === "flagged") { return item.flagged; }
    if (filter === "warnings") { return item.warn; }
    return true;
  }

  function cell(tr, className) {
    var td = document.createElement("td");
    if (className) { td.className = className; }
    tr.appendChild(td);
    return td;
  }

  function number(v) {
    if (v === null) { return "–"; }
    if (typeof v !== "number") { return String(v); }
    return Math.abs(v) >= 1e9 ? v.toPrecision(4) : v.toFixed(4);
  }

  // a data row as a <tr> like the page's own rows, built with text nodes only
  function build(item) {
    var d = item.data;
    var tr = document.createElement("tr");
    tr.id = "item-" + d[0];
    tr.dataset.item = d[0];
    tr.dataset.status = item.status;
    tr.dataset.flagged = String(d[3]);
    tr.dataset.warn = d[4].length ? "1" : "0";
    tr.className = item.status;
    var first = cell(tr);
    var link = document.createElement("a");
    link.className = "itemlink";
    link.title = "link to this item";
    link.textContent = "#";
    first.appendChild(link);
    first.appendChild(document.createTextNode(" "));
    var id = document.createElement("span");
    id.className = "muted";
    id.textContent = d[1];
    first.appendChild(id);
    cell(tr);
    cell(tr).appendChild(document.createElement("div")).className = "pair";
    var text = cell(tr, "caption");
    if (d[5]) {
      text.appendChild(document.createElement("b")).textContent = d[5];
      text.appendChild(document.createTextNode(": "));
    }
    if (d[7]) {
      text.appendChild(document.createElement("span")).className = "flagged";
      text.lastChild.textContent = d[6];
    } else {
      text.appendChild(document.createTextNode(d[6]));
    }
    for (var m = 0; m < metrics.length; m++) {
      var v = d[8 + m];
      var td = cell(tr, "num");
      td.dataset.v = typeof v === "number" ? String(v) : "";
      td.textContent = number(v);
    }
    var warnings = cell(tr);
    warnings.dataset.v = String(d[4].length);
    if (d[4].length) {
      var list = warnings.appendChild(document.createElement("ul"));
      list.className = "warnings";
      d[4].forEach(function (w) { list.appendChild(document.createElement("li")).textContent = w; });
    }
    return tr;
  }

  function apply() {
    var s = state();
    var column = -1;
    headers.forEach(function (th, i) {
      th.removeAttribute("aria-sort");
      if (th.dataset.key === s.sort) { column = i; }
    });
    var list = items.filter(function (item) { return keep(item, s.show); });
    if (column >= 0) {
      var sign = s.dir === "desc" ? -1 : 1;
      headers[column].setAttribute("aria-sort", s.dir === "desc" ? "descending" : "ascending");
      var value = valueOf(column);
      var keyed = list.map(function (item) { return {v: value(item), item: item}; });
      keyed.sort(function (a, b) {
        if (a.v === null || b.v === null) {  // missing values last, whatever the direction
          return (a.v === null) - (b.v === null) || a.item.order - b.item.order;
        }
        return sign * (a.v - b.v) || a.item.order - b.item.order;
      });
      list = keyed.map(function (k) { return k.item; });
    }
    var pages = Math.max(1, Math.ceil(list.length / pageRows));
    var page = Math.min(s.page, pages);
    if (s.item !== "") {  // the page that holds the linked item
      for (var i = 0; i < list.length; i++) {
        if (list[i].key === s.item) { page = Math.floor(i / pageRows) + 1; break; }
      }
    }
    var start = (page - 1) * pageRows;
    body.textContent = "";
    var target = null;
    list.slice(start, start + pageRows).forEach(function (item) {
      if (!item.el) { item.el = build(item); }
      var row = item.el;
      row.hidden = false;
      body.appendChild(row);
      var link = row.querySelector("a.itemlink");
      if (link) { link.setAttribute("href", fragment(s, ["item=" + encodeURIComponent(item.key)])); }
      row.classList.toggle("target", s.item !== "" && item.key === s.item);
      if (s.item !== "" && item.key === s.item) { target = row; }
    });
    if (show) { show.value = s.show; }
    if (view) {
      view.textContent = "Showing " + list.length + " of " + items.length + " items, sorted by " +
        (column >= 0 ? s.sort + (s.dir === "desc" ? " (descending)" : " (ascending)") : "input order") + "." +
        (pages > 1 ? " Page " + page + " of " + pages + " (turn pages under the table)." : "") + note;
    }
    if (pageText) {
      pageText.textContent = list.length ? "page " + page + " of " + pages + " (items " + (start + 1) + "–" +
        Math.min(start + pageRows, list.length) + ")" : "no items";
    }
    [[prev, page - 1], [next, page + 1]].forEach(function (p) {
      if (!p[0]) { return; }
      p[0].hidden = p[1] < 1 || p[1] > pages;
      p[0].setAttribute("href", fragment(s, ["page=" + p[1]]));
    });
    if (target) { target.scrollIntoView(); }
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
