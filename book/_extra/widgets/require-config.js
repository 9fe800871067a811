// Loaded between require.js and embed-amd.js (see _config.yml, nb_ipywidgets_js).
// embed-amd.js finds its icon fonts next to the AMD module
// "@jupyter-widgets/html-manager/dist/libembed-amd"; map that module path to this folder,
// so that the fonts come from here and not from a path next to the page.
(function () {
  var here = document.currentScript.src.split("?")[0].replace(/\/[^/]*$/, "");
  window.require.config({ paths: { "@jupyter-widgets/html-manager/dist": here } });
})();
