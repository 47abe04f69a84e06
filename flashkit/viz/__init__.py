"""plotly figures and ipywidgets apps used by the notebooks (implementations never import this)."""
